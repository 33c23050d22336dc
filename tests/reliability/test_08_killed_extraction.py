"""Catalog 8: extraction SIGKILLed mid-way, several times at random points, then resumed.

tests/reliability/kill_driver.py runs ``nnUNetv2_extract_textguided``'s main() in forked children of one warm
process (startup paid once): an uninterrupted reference extraction on one copy of the preprocessed dataset; on
another copy 5 children SIGKILLed inside the store's write protocol at a random rename (k-th of the run, just before
or just after it) and 2 SIGKILLed after a random delay (these may finish first); then a final run. Asserted: every
kill leaves the entries completed before it byte-identical; every run that finishes recomputes exactly the cases
still missing; the final store equals the uninterrupted one file by file, byte for byte.

A kill between the temporary file's write and its rename leaves that temporary file (``.<name>.<random>.tmp``) in the
store folder: the only extra files allowed after the final run. A later extraction removes those older than
STALE_TEMP_SECONDS (a younger one may be a concurrent extraction's write): aged here, one more run leaves exactly the
uninterrupted store.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from reliability_helpers import NOTE_CONFIG, NOTE_TRAINER, extract_output, private_dataset, snapshot

DRIVER = Path(__file__).with_name("kill_driver.py")
TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]+\.tmp$")


def test_killed_extraction_resumes_to_the_uninterrupted_store(referring_dataset, tmp_path, monkeypatch, capsys):
    _, pre = private_dataset(referring_dataset, tmp_path, monkeypatch)
    reference = tmp_path / "reference"
    shutil.copytree(pre, reference / pre.name)
    seed = int(os.environ.get("RELIABILITY_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    config = {"argv": ["-d", pre.name, "-c", NOTE_CONFIG, "-tr", NOTE_TRAINER], "encoder": "minilm",
              "reference": str(reference), "pre": str(tmp_path / "pre"), "seed": seed, "hook_kills": 5,
              "timed_kills": 2}
    (tmp_path / "logs").mkdir()
    cfg_file = tmp_path / "logs" / "config.json"
    cfg_file.write_text(json.dumps(config))
    r = subprocess.run([sys.executable, str(DRIVER), str(cfg_file)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    why = f"(RELIABILITY_KILL_SEED={seed}) {json.dumps(report)[-4000:]}"
    n = report["cases"]
    assert n == 16 and report["reference"]["rc"] == 0, why
    assert f"embeddings computed: {n}, already current: 0" in report["reference"]["output"], why

    killed = [x for x in report["rounds"] if x["signal"] == 9]
    assert len(killed) >= 5, why
    assert all(x["kill"]["kind"] == "hook" and x["signal"] == 9 for x in report["rounds"][:5]), why
    for x in report["rounds"] + [report["final"]]:
        assert not x.get("changed"), why  # what was complete before a kill is untouched by it
        assert x["signal"] == 9 or x["rc"] == 0, why
        if x["rc"] == 0:  # a run that was not killed (in time) resumed: it computed exactly what was missing
            m = x["missing_before"]
            assert f"embeddings computed: {m}, already current: {n - m}" in x["output"], why
    assert report["final"]["rc"] == 0, why

    ref_store = snapshot(reference / pre.name / "nnUNetPlans_2d" / "textguided")
    store = snapshot(pre / "nnUNetPlans_2d" / "textguided")
    extra = sorted(set(store) - set(ref_store))
    assert all(TEMP_FILE.match(Path(k).name) for k in extra), (extra, why)  # temporary files of killed writes
    assert {k: v for k, v in store.items() if k not in extra} == ref_store, why
    assert sum(k.endswith(".npy") for k in ref_store) == n

    # once stale, the next extraction removes them and computes nothing
    from nnunet_textguided.conditioning.store import STALE_TEMP_SECONDS
    old = time.time() - STALE_TEMP_SECONDS - 60
    for k in extra:
        os.utime(pre / "nnUNetPlans_2d" / "textguided" / k, (old, old))
    rc, out, err = extract_output(config["argv"], capsys)
    assert rc == 0 and f"embeddings computed: 0, already current: {n}" in out, (out, err, why)
    assert not extra or f"WARNING: removed {len(extra)} temporary file(s)" in err, (err, why)
    assert snapshot(pre / "nnUNetPlans_2d" / "textguided") == ref_store, why
