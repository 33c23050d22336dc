"""The papers' ablation rows as data: which trainer and which settings reproduce each row, and what the paper
reports for it; ``nnunet-textguided ablation METHOD`` lists them and runs any subset into one table.

A row is a trainer (the module switches: ``RecLMISTrainer_CI``, ...) plus settings written into a configuration of
its own (``<configuration>_abl_<row>``, through ``presets.add_configuration``, so the settings travel in the plans
like any other), trained with the stock ``nnUNetv2_train`` and scored by ``text_dependence.run`` (Dice on the
dataset's test cases with their true notes and with shuffled notes).

Paper figures are the seeds' (each row says which metric and dataset). Sweep rows read off a figure whose values
the seed's text does not give carry "figure only"; rows the package cannot run (TGC-Net's fine-tuned CLIP towers)
are listed with the reason.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["AblationRow", "ROWS", "rows_of", "select_rows", "format_listing", "configuration_name", "run"]


@dataclass(frozen=True)
class AblationRow:
    """One row of a paper's ablation table or figure."""
    name: str  # unique within the method, e.g. "III-d"
    source: str  # where in the paper: "Table III (d)", "Fig. 11"
    what: str
    trainer: str
    settings: dict = field(default_factory=dict)
    paper: str = ""  # the paper's figures for the row, or "figure only"
    metric: str = "Dice / mIoU %, QaTa-COV19"  # what the paper's figures are
    not_offered: str = ""  # why a listed row cannot run here (empty: it runs)


# §IV-D: "For all ablation experiments except those figures (Fig 7, Fig 8, Fig 12), the text masking ratio and the
# visual masking ratio are both 0.3 in this section."
_RECLMIS_ABLATION = {"image_mask_rate": 0.3, "text_mask_rate": 0.3}
_RECLMIS_FULL = "84.84 / 76.44"
_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _reclmis_rows() -> list[AblationRow]:
    t, a = "RecLMISTrainer", _RECLMIS_ABLATION
    rows = [
        AblationRow("III-a", "Table III (a)", "CI + CLR + CVR (the full model)", t, a, _RECLMIS_FULL),
        AblationRow("III-b", "Table III (b)", "CI + CVR, no CLR", "RecLMISTrainer_noCLR", a, "84.43 / 75.98"),
        AblationRow("III-c", "Table III (c)", "CI + CLR, no CVR", "RecLMISTrainer_noCVR", a, "84.30 / 75.84"),
        AblationRow("III-d", "Table III (d)", "CI only (CCL kept: Sec. III-B2 is part of CI)", "RecLMISTrainer_CI", a,
                    "82.52 / 73.35"),
        AblationRow("III-e", "Table III (e)", "baseline: UNet + PLAM without text", "RecLMISTrainer_noCI", a,
                    "79.37 / 70.00"),
        AblationRow("IV-none", "Table IV, row 1", "no condition in CCL, CLR or CVR", t, {**a, "conditions": []},
                    "84.14 / 75.57"),
    ]
    # the seed's Table IV lost its check marks: rows 2-4 (84.56 / 75.97, 84.35 / 75.94, 84.63 / 76.19) each lack
    # conditions somewhere, but which row lacks which is not legible
    for module in ("ccl", "clr", "cvr"):
        keep = [m for m in ("ccl", "clr", "cvr") if m != module]
        rows.append(AblationRow(f"IV-no{module}", "Table IV, rows 2-4", f"no condition in {module.upper()} only", t,
                                {**a, "conditions": keep}, "one of 84.56 / 75.97, 84.35 / 75.94, 84.63 / 76.19"))
    rows += [
        AblationRow("IV-all", "Table IV, row 5", "conditions in CCL, CLR and CVR (= III-a)", t, a, _RECLMIS_FULL),
        AblationRow("V-SA-CA", "Table V, row 1", "self-attention CI, cross-attention CVR & CLR", t,
                    {**a, "ci_attention": "self"}, "79.37 / 69.87"),
        AblationRow("V-SA-SA", "Table V, row 2", "self-attention CI and reconstruction", t,
                    {**a, "ci_attention": "self", "reconstruction_attention": "self"}, "78.91 / 69.51"),
        AblationRow("V-CA-SA", "Table V, row 3", "cross-attention CI, self-attention reconstruction", t,
                    {**a, "reconstruction_attention": "self"}, "84.50 / 75.98"),
        AblationRow("V-CA-CA", "Table V, row 4", "cross-attention CI and reconstruction (= III-a)", t, a,
                    _RECLMIS_FULL),
    ]
    for strategy in ("random", "interest"):
        for r in _RATIOS:
            rows.append(AblationRow(f"F7-{strategy}-{r}", "Fig. 7", f"{strategy} masking, α_v = α_t = {r}", t,
                                    {"mask_strategy": strategy, "image_mask_rate": r, "text_mask_rate": r},
                                    "figure only"))
    for r in _RATIOS:
        rows.append(AblationRow(f"F8-av{r}", "Fig. 8", f"α_v = {r}, α_t = 0.3", t,
                                {"image_mask_rate": r, "text_mask_rate": 0.3},
                                "best at 0.5 (§IV-D4)" if r == 0.5 else "figure only"))
    for r in _RATIOS:
        rows.append(AblationRow(f"F8-at{r}", "Fig. 8", f"α_t = {r}, α_v = 0.5", t,
                                {"image_mask_rate": 0.5, "text_mask_rate": r},
                                "best at 0.3 (§IV-D4)" if r == 0.3 else "figure only"))
    for n in range(1, 11):
        rows.append(AblationRow(f"F11-L{n}", "Fig. 11", f"{n} conditioned reconstruction layers", t,
                                {**a, "reconstructor_layers": n}, "best at 3 (§IV-D6)" if n == 3 else "figure only"))
    # Fig. 12 varies each λ and the learning rate around the defaults (α_t 0.3, α_v 0.5); the text names two
    # values (λ1 1.5 and λ3 0.5: "the most significant performance decline"), the others are ours
    for i, (key, values) in enumerate((("loss_clr", (0.5, 1.5)), ("loss_cvr", (0.5, 1.5)),
                                       ("loss_ccl", (0.1, 0.5)), ("loss_seg", (3.0, 7.0))), start=1):
        for v in values:
            named = (i, v) in ((1, 1.5), (3, 0.5))
            rows.append(AblationRow(f"F12-l{i}-{v}", "Fig. 12", f"λ{i} = {v}", t, {key: v},
                                    "the largest drop (§IV-D7)" if named else "figure only"))
    for lr in (1e-4, 5e-4):
        rows.append(AblationRow(f"F12-lr-{lr:g}", "Fig. 12", f"learning rate {lr:g}", t, {"lr": lr}, "figure only"))
    rows.append(AblationRow("ours-code-placement", "ours", "conditioned attention as the authors' code (W after "
                            "the softmax, renormalised) instead of eq. 7 / 9", t,
                            {"condition_placement": "probabilities"}, "—"))
    return rows


def _tgcnet_rows() -> list[AblationRow]:
    """Seed 001, Tables 3-6 (Dice %, QaTa-COV19 / MosMedData+)."""
    m = "Dice %, QaTa-COV19 / MosMedData+"
    full = "90.54 / 80.94"
    frozen = "the CLIP towers stay frozen here (the paper's design keeps them frozen)"
    return [
        AblationRow("T3-a", "Table 3 (a)", "SSE + DATE + VLCM (the full model)", "TGCNetTrainer", {}, full, m),
        AblationRow("T3-b", "Table 3 (b)", "no SSE (CLIP tokens only)", "TGCNetTrainer_noSSE", {}, "89.55 / 79.38", m),
        AblationRow("T3-c", "Table 3 (c)", "no VLCM", "TGCNetTrainer_noVLCM", {}, "89.95 / 79.62", m),
        AblationRow("T3-d", "Table 3 (d)", "no DATE (primary note only)", "TGCNetTrainer_noDATE", {}, "89.90 / 79.18", m),
        AblationRow("T3-e", "Table 3 (e)", "none of the three", "TGCNetTrainer_none", {}, "88.22 / 76.79", m),
        AblationRow("T4-sse", "Table 4", "SSE, frozen CLIP (the final model, = T3-a)", "TGCNetTrainer", {}, full, m),
        AblationRow("T4-cnn", "Table 4", "CNN-only (no CLIP image tower)", "TGCNetTrainer_CNNonly", {},
                    "89.17 / 76.81", m),
        AblationRow("T4-vit", "Table 4", "ViT-only, frozen (= T3-b)", "TGCNetTrainer_noSSE", {}, "89.55 / 79.38", m),
        AblationRow("T4-vit-qv", "Table 4", "ViT-only, q/v projections fine-tuned", "TGCNetTrainer_noSSE", {},
                    "89.60 / 79.86", m, frozen),
        AblationRow("T4-vit-ft", "Table 4", "ViT-only, fully fine-tuned", "TGCNetTrainer_noSSE", {}, "90.19 / 78.51",
                    m, frozen),
        AblationRow("T4-sse-ft", "Table 4", "CNN + ViT, ViT fully fine-tuned", "TGCNetTrainer", {}, "90.15 / 80.00", m,
                    frozen),
        AblationRow("T5-main", "Table 5", "main text only (= T3-d)", "TGCNetTrainer_noDATE", {}, "89.90 / 79.18", m),
        AblationRow("T5-aux", "Table 5", "auxiliary text only", "TGCNetTrainer_auxOnly", {}, "89.71 / 79.02", m),
        AblationRow("T5-llm", "Table 5", "LLM-expanded text as the only note: an input variant — write the expanded "
                    "notes as <CASE>.txt (no LLM runs here) and train the main-text-only trainer",
                    "TGCNetTrainer_noDATE", {}, "89.97 / 79.00", m),
        AblationRow("T6-none", "Table 6", "no prior alignment (= T3-c)", "TGCNetTrainer_noVLCM", {}, "89.95 / 79.62", m),
        AblationRow("T6-single", "Table 6", "single cross-attention", "TGCNetTrainer_singleCA", {}, "90.25 / 80.03", m),
        AblationRow("T6-bi", "Table 6", "bidirectional cross-attention", "TGCNetTrainer_biCA", {}, "90.39 / 80.11", m),
    ]


def _mptpn_rows() -> list[AblationRow]:
    """Seed 003, Table 3 (Dice / mIoU / Acc %, QaTa-COV19)."""
    m = "Dice / mIoU / Acc %, QaTa-COV19"
    return [
        AblationRow("T3-full", "Table 3, row 6", "the full model (PPE from stage 1)", "MPTPNTrainer", {},
                    "91.53 / 85.67 / 95.01", m),
        AblationRow("T3-noDownViT", "Table 3, row 1", "no DownViT", "MPTPNTrainer_noDownViT", {},
                    "91.29 / 84.20 / 93.93", m),
        AblationRow("T3-noUpViT", "Table 3, row 2", "no UpViT", "MPTPNTrainer_noUpViT", {}, "91.22 / 84.01 / 93.96", m),
        AblationRow("T3-noPPE", "Table 3, row 3", "PPE* without the stage-1 parameters", "MPTPNTrainer_noPretrain", {},
                    "90.91 / 83.60 / 93.66", m),
        AblationRow("T3-noMSFF", "Table 3, row 4", "no MSFF", "MPTPNTrainer_noMSFF", {}, "84.72 / 73.78 / 87.34", m),
        AblationRow("T3-noUpAttention", "Table 3, row 5", "no UpAttention", "MPTPNTrainer_noUpAttention", {},
                    "91.19 / 84.07 / 93.77", m),
    ]


ROWS: dict[str, list[AblationRow]] = {"reclmis": _reclmis_rows(), "tgcnet": _tgcnet_rows(), "mptpn": _mptpn_rows()}


def rows_of(method: str) -> list[AblationRow]:
    if method not in ROWS:
        raise ValueError(f"no ablation rows for method {method!r}; methods with rows: {', '.join(sorted(ROWS))}")
    return ROWS[method]


def select_rows(method: str, patterns: list[str] | None) -> list[AblationRow]:
    """The rows whose names match any of the shell-style ``patterns`` (all rows without patterns)."""
    rows = rows_of(method)
    if not patterns:
        return rows
    chosen = [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(r.name, p) for r in rows)]
    if unmatched:
        raise ValueError(f"no {method} ablation row matches {', '.join(unmatched)}; rows: "
                         f"{', '.join(r.name for r in rows)}")
    return chosen


def _settings_text(settings: dict) -> str:
    """As ``add-config --set`` takes them: lists comma-separated, ``none`` for an empty one."""
    def value(v):
        return (",".join(map(str, v)) or "none") if isinstance(v, (list, tuple)) else str(v)
    return " ".join(f"{k}={value(v)}" for k, v in settings.items())


def format_listing(method: str, rows: list[AblationRow]) -> str:
    metric = rows[0].metric if rows else ""
    lines = [f"{method}: {len(rows)} ablation rows (paper figures: {metric})", "",
             "| row | source | what | trainer | settings | paper |", "|---|---|---|---|---|---|"]
    for r in rows:
        trainer = f"not offered: {r.not_offered}" if r.not_offered else r.trainer
        lines.append(f"| {r.name} | {r.source} | {r.what} | {trainer} | {_settings_text(r.settings)} | "
                     f"{r.paper} |")
    return "\n".join(lines)


def configuration_name(base: str, row: AblationRow, budget: dict) -> str:
    """``<base>_abl_<row>[_e<epochs>x<iterations>]``: one configuration (and results folder) per row and budget."""
    tag = re.sub(r"[^A-Za-z0-9]+", "_", row.name).strip("_")
    if budget:
        tag += f"_e{budget.get('epochs', 'd')}x{budget.get('iterations_per_epoch', 'd')}"
    return f"{base}_abl_{tag}"


def _base_block(plans: dict, base: str, method: str) -> dict:
    """The method's settings of configuration ``base`` (what the row's settings are laid over)."""
    configurations = plans["configurations"]
    block, seen = {}, set()
    name = base
    while name in configurations and name not in seen:  # a configuration's own block wins over its parents'
        seen.add(name)
        own = (configurations[name].get("textguided") or {}).get(method)
        if own:
            block = {**own, **block}
        name = configurations[name].get("inherits_from")
    return block


def run(method: str, dataset: str, base: str, rows: list[AblationRow], output: Path, fold: str = "0",
        device: str = "cpu", budget: dict | None = None, plans: str = "nnUNetPlans") -> list[dict]:
    """Train (``nnUNetv2_train``, skipped when the row's final checkpoint exists) and score each row; writes
    ``output/ablation_<method>.json`` and returns its rows."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from ..data.names import dataset_name

    from ..io import atomic_write_json
    from ..presets import add_configuration, available_presets
    from .text_dependence import run as text_dependence

    refused = [f"{r.name} ({r.not_offered})" for r in rows if r.not_offered]
    if refused:  # before anything is read or written
        raise ValueError(f"these rows are listed but cannot run here: {'; '.join(refused)}")
    budget = dict(budget or {})
    name = dataset_name(dataset, ("nnUNet_preprocessed",))
    plans_file = Path(nnUNet_preprocessed) / name / f"{plans}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans_data = json.loads(plans_file.read_text())
    if base not in plans_data["configurations"] and base not in available_presets():
        raise ValueError(f"unknown configuration {base!r}: neither in {plans_file} nor a preset")
    base_settings = _base_block(plans_data, base, method) if base in plans_data["configurations"] else {}
    results = []
    for row in rows:
        configuration = configuration_name(base, row, budget)
        add_configuration(plans_file, base, configuration, method, {**base_settings, **row.settings, **budget})
        final = (Path(nnUNet_results) / name / f"{row.trainer}__{plans}__{configuration}" / f"fold_{fold}"
                 / "checkpoint_final.pth")
        log = output / f"{row.name}.train.log"
        output.mkdir(parents=True, exist_ok=True)
        if not final.is_file():
            print(f"[{row.name}] nnUNetv2_train {name} {configuration} {fold} -tr {row.trainer}  (log: {log})",
                  flush=True)
            with open(log, "w") as f:
                r = subprocess.run([sys.executable, "-c", "from nnunetv2.run.run_training import "
                                    "run_training_entry; run_training_entry()", name, configuration, fold,
                                    "-tr", row.trainer, "-p", plans, "-device", device],
                                   stdout=f, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                raise RuntimeError(f"training row {row.name} failed (exit {r.returncode}); see {log}")
        scored = text_dependence(name, configuration, [row.trainer], output / row.name, fold, plans, device=device)
        dice = scored["dice"][row.trainer]
        results.append({"row": row.name, "source": row.source, "what": row.what, "trainer": row.trainer,
                        "configuration": configuration, "settings": row.settings, "paper": row.paper,
                        "dice_true_notes": dice["true"], "dice_shuffled_notes": dice["shuffled"]})
        print(f"[{row.name}] Dice {dice['true']:.3f} (shuffled notes {dice['shuffled']:.3f})", flush=True)
    atomic_write_json(output / f"ablation_{method}.json",
                      {"method": method, "dataset": name, "base_configuration": base, "fold": fold,
                       "budget": budget, "rows": results})
    return results


def format_results(method: str, results: list[dict]) -> str:
    lines = [f"{method} ablation rows: mean foreground Dice on the test cases", "",
             "| row | source | trainer | settings | paper | Dice | Dice, shuffled notes |",
             "|---|---|---|---|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['source']} | {r['trainer']} | {_settings_text(r['settings'])} | {r['paper']} "
                     f"| {r['dice_true_notes']:.3f} | {r['dice_shuffled_notes']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="nnunet-textguided ablation", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List the ablation rows of a method's paper (without -d), or train and score some of them on a "
                    "dataset (with -d, -c and -o): one configuration per row carries the row's settings; the table "
                    "gives Dice with true and shuffled notes next to the paper's figures.")
    p.add_argument("method", help=f"method with ablation rows: {', '.join(sorted(ROWS))}")
    p.add_argument("--rows", nargs="+", metavar="PATTERN", help="row names or shell patterns, e.g. III-* F11-L3")
    p.add_argument("-d", help="dataset name or id (runs the rows)")
    p.add_argument("-c", help="configuration or preset the rows' configurations start from, e.g. 2d_tiny")
    p.add_argument("-o", help="output folder (logs, predictions, ablation_<method>.json)")
    p.add_argument("-f", default="0", help="fold (default 0)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-device", "--device", dest="device", default="cpu", help="cpu or cuda")
    p.add_argument("--epochs", type=int, help="training budget: epochs (default: the method's setting)")
    p.add_argument("--iterations", type=int, help="training budget: iterations per epoch, also used for the "
                   "validation iterations (default: the settings)")
    a = p.parse_args(argv)
    try:
        rows = select_rows(a.method, a.rows)
        if a.d is None:
            print(format_listing(a.method, rows))
            return 0
        if not (a.c and a.o):
            raise ValueError("running rows needs -c (configuration) and -o (output folder)")
        budget = {k: v for k, v in (("epochs", a.epochs), ("iterations_per_epoch", a.iterations),
                                    ("val_iterations_per_epoch", a.iterations)) if v is not None}
        results = run(a.method, a.d, a.c, rows, Path(a.o), a.f, a.device, budget, a.p)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"nnunet-textguided ablation: error: {e}", file=sys.stderr)
        return 2
    print(format_results(a.method, results))
    print(f"\nwritten: {os.path.join(a.o, f'ablation_{a.method}.json')}")
    return 0
