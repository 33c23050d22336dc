"""Kill-and-resume driver of catalog item 8 (run as a script by test_08_killed_extraction.py; not a test module).

One warm process imports the package and loads the text encoder once (set to one thread before any torch work, so
forking is safe), then runs ``nnUNetv2_extract_textguided``'s ``main()`` in forked children:

1. a reference child: an uninterrupted extraction into the reference copy of the preprocessed dataset;
2. kill rounds on the other copy, each SIGKILLed at a random point (the hook rounds first: each of them is sure to
   hit a write, since at least one case is still missing when it starts):
   - ``hook``: the child SIGKILLs itself at its k-th ``os.replace`` (the store's atomic rename), just before or just
     after it, with k drawn from 1..(cases still missing): a kill inside the store's write protocol (temporary
     file written but not renamed; .npy renamed but its .json marker not yet written; right after an entry);
   - ``timed``: the parent SIGKILLs the child after a random delay within the reference run's duration (it may
     finish first: then it simply resumed);
   before each round the complete entries are hashed, after it they must be unchanged;
3. a final uninterrupted child that resumes.

Prints one JSON report on stdout; the children's own output goes to files beside the config.
"""
import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)

from nnunet_textguided.conditioning import extract  # noqa: E402
from nnunet_textguided.conditioning.slices import get_encoder  # noqa: E402


def store_dirs(pre: str) -> list[Path]:
    return sorted(Path(pre).glob("*/*/textguided/*__*"))


def complete_entries(pre: str) -> dict[str, str]:
    """{store dir/case.npy and .json: sha256} of the cases whose .json marker and .npy both exist."""
    out = {}
    for d in store_dirs(pre):
        for meta in d.glob("*.json"):
            if meta.name == "manifest.json" or meta.name.startswith("."):
                continue
            arr = meta.with_suffix(".npy")
            if arr.is_file():
                for p in (meta, arr):
                    out[str(p.relative_to(pre))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def child(argv, pre, log, kill):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["nnUNet_preprocessed"] = pre
    if kill and kill["kind"] == "hook":
        real, calls = os.replace, [0]

        def replace(src, dst):
            calls[0] += 1
            hit = calls[0] == kill["k"]
            if hit and kill["when"] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
            if hit and kill["when"] == "after":
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
    rc = extract.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def run(argv, pre, log, kill=None) -> dict:
    start = time.time()
    pid = os.fork()
    if pid == 0:
        try:
            child(argv, pre, log, kill)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(99)
    if kill and kill["kind"] == "timed":
        time.sleep(kill["delay"])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return {"kill": kill, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "seconds": round(time.time() - start, 3),
            "output": Path(log).read_text(errors="replace")[-3000:]}


def main(config_file: str) -> None:
    cfg = json.loads(Path(config_file).read_text())
    logs = Path(config_file).parent
    rng = random.Random(cfg["seed"])
    get_encoder(cfg["encoder"]).weight_hash()  # warm: loaded once, before any fork
    report = {"reference": run(cfg["argv"], cfg["reference"], str(logs / "reference.log")), "rounds": []}
    n = len(complete_entries(cfg["reference"])) // 2
    kinds = ["hook"] * cfg["hook_kills"] + ["timed"] * cfg["timed_kills"]
    for i, kind in enumerate(kinds):
        before = complete_entries(cfg["pre"])
        missing = n - len(before) // 2
        if kind == "hook":
            kill = {"kind": "hook", "k": rng.randint(1, max(1, missing)), "when": rng.choice(["before", "after"])}
        else:
            kill = {"kind": "timed", "delay": round(rng.uniform(0.0, report["reference"]["seconds"]), 3)}
        result = run(cfg["argv"], cfg["pre"], str(logs / f"round_{i}.log"), kill)
        after = complete_entries(cfg["pre"])
        result.update(missing_before=missing, complete_after=len(after) // 2,
                      changed=sorted(k for k in before if after.get(k) != before[k]))
        report["rounds"].append(result)
    missing = n - len(complete_entries(cfg["pre"])) // 2
    report["final"] = {**run(cfg["argv"], cfg["pre"], str(logs / "final.log")), "missing_before": missing}
    report["cases"] = n
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
