"""The settings schema: every key of every method reachable by ``--set`` and validated, trainer variants as defaults
only, the paper's encoders as the paper-named trainers' defaults, legacy variables refused with their ``--set``
line, and no module but ``settings`` reading ``nnUNet_textguided_*`` variables."""
from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import pytest

from nnunet_textguided import settings as S
from nnunet_textguided.encoders.registry import is_untrained_spec
from nnunet_textguided.training import trainer_classes

ROOT = Path(__file__).resolve().parents[1]


def sample_text(info: S.KeyInfo) -> tuple[str, object]:
    """A valid ``--set`` text for a key other than its default, and the JSON value it must give."""
    t = info.type
    origin, args = typing.get_origin(t), typing.get_args(t)
    if S._is_union(origin):
        return "none", None
    if origin is typing.Literal:
        other = [a for a in args if a != info.default]
        return str(other[0]), other[0]
    if origin is tuple:
        if args[-1] is Ellipsis:
            item = typing.get_args(args[0]) or (2,)
            return ",".join(map(str, item[:1])), list(item[:1])
        return ",".join(["64"] * len(args)), [64] * len(args)
    if t is bool:
        return ("false", False) if info.default else ("true", True)
    if t is int:
        v = int(max(info.minimum or 0, 1)) + 3
        return str(v), v
    if t is float:
        lo, hi = info.minimum if info.minimum is not None else 0.0, info.maximum if info.maximum is not None else 1.0
        v = (lo + hi) / 2 if info.maximum is not None else (info.above or lo) + 0.25
        return repr(v), v
    if info.kind == "encoder":
        return "tiny-clip", "tiny-clip"
    return "some/file.pth", "some/file.pth"


CASES = [(m, k) for m in S.SCHEMAS for k in S.keys(m)]


@pytest.mark.parametrize("method, name", CASES, ids=[f"{m}.{k}" for m, k in CASES])
def test_every_key_is_reachable_by_set_and_validated(method, name):
    info = S.keys(method)[name]
    assert info.meaning and info.paper, f"{method}.{name} is not documented"
    text, expected = sample_text(info)
    value = S.check_value(method, name, S.parse_text(method, name, text))
    assert value == expected
    resolved = S.as_dict(S.resolve(method, {"textguided": {method: {name: value}}}))
    assert resolved[name] == expected
    inner = [a for a in typing.get_args(info.type) if a is not type(None)] if S._is_union(
        typing.get_origin(info.type)) else [info.type]
    if typing.get_origin(inner[0]) is not typing.Literal and inner[0] is not str:  # any text is a str
        with pytest.raises(S.SettingsError, match=f"{name}=.*Valid keys for {method}: "):
            S.check_value(method, name, "not-a-value-of-this-type" if info.type is not bool else "maybe")


@pytest.mark.parametrize("method, name, value, why", [
    ("biclip", "lr", -1.0, "must be > 0"), ("reclmis", "image_mask_rate", 1.5, "must be <= 1"),
    ("cdpdnet", "fusion_window", [3, 3], "must have 3 entries"), ("tgcnet", "sse", "both", "must be one of"),
    ("biclip", "streams", ["image", "image"], "repeated"), ("mptpn", "max_tokens", 1, "must be >= 2"),
    ("biclip", "epochs", 2.5, "whole number"), ("cdpdnet", "use_dino", "yes please", "true or false")])
def test_out_of_range_and_wrong_type_values_are_refused_with_the_valid_keys(method, name, value, why):
    with pytest.raises(S.SettingsError, match=why) as e:
        S.check_value(method, name, value)
    assert all(k in str(e.value) for k in S.keys(method))


def test_unknown_keys_and_keys_of_another_method_list_the_valid_keys():
    with pytest.raises(S.SettingsError, match="unknown key 'colour'") as e:
        S.check_value("biclip", "colour", 1)
    assert "Valid keys for biclip: image_encoder, caption_encoder" in str(e.value)
    with pytest.raises(S.SettingsError, match="'max_tokens' is a key of reclmis, tgcnet, mptpn, not of biclip"):
        S.check_value("biclip", "max_tokens", 10)
    with pytest.raises(S.SettingsError, match="no method"):
        S.resolve("biclip", {"textguided": {"bicllip": {}}})


def test_a_variant_only_changes_defaults_and_a_contradicting_configuration_is_refused():
    from nnunet_textguided.training.biclip import BiCLIPTrainer, BiCLIPTrainer_Net2, BiCLIPTrainer_Net2_2epochs
    assert BiCLIPTrainer_Net2.own_settings() == {"streams": ("image",)}
    assert BiCLIPTrainer_Net2_2epochs.own_settings() == {"streams": ("image",), "epochs": 2, "iterations_per_epoch": 4,
                                                         "val_iterations_per_epoch": 2, "mirror_axes": (0,)}
    conf = {"textguided": {"biclip": {"lr": 0.1, "streams": ["image"]}}}
    s = BiCLIPTrainer_Net2_2epochs.resolve_settings(conf)
    assert (s.lr, s.streams, s.epochs, s.image_encoder) == (0.1, ("image",), 2, BiCLIPTrainer.resolve_settings({})
                                                            .image_encoder)
    with pytest.raises(S.SettingsError, match=r"BiCLIPTrainer_Net2 is defined by streams=\["):
        BiCLIPTrainer_Net2.resolve_settings({"textguided": {"biclip": {"streams": ["image", "caption"]}}})


#: trainers with code of their own beyond settings: nnFormer's configuration check
OWN_CODE = {"nnFormerTrainer"}


def test_every_ablation_and_schedule_trainer_only_changes_schema_defaults():
    allowed = {"variant_settings", "schedule_of", "__module__", "__doc__", "__qualname__", "__firstlineno__",
               "__static_attributes__"}
    variants = [t for t in trainer_classes() if "_" in t.__name__ and t.__name__ not in OWN_CODE]
    assert len(variants) > 80
    for t in variants:
        S.check_values(t.textguided_method, t.own_settings())  # valid keys of its method
        assert set(vars(t)) <= allowed, (t.__name__, set(vars(t)) - allowed)


#: the paper's encoders of each paper-named trainer (seeds 000-004; settings.py cites where)
PAPER_ENCODERS = {
    "BiCLIPTrainer": {"image_encoder": "pmcclip:pmc-clip/image_encoder(resnet50).pth",
                      "caption_encoder": "coca:coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k"},
    "CDPDNetTrainer": {"text_encoder": "openclip:ViT-B-32@openai", "dino_encoder": "hf:facebook/dinov2-base"},
    "TGCNetTrainer": {"text_encoder": "openclip:ViT-L-14-336@openai", "image_encoder": "openclip:ViT-L-14-336@openai"},
    "MPTPNTrainer": {"text_encoder": "hf:bert-base-uncased"},
    "RecLMISTrainer": {"text_encoder": "openclip:ViT-B-32@openai"},
}


@pytest.mark.parametrize("trainer", sorted(PAPER_ENCODERS))
def test_paper_named_trainers_default_to_the_papers_encoders_and_no_stand_in(trainer):
    cls = next(t for t in trainer_classes() if t.__name__ == trainer)
    s = cls.resolve_settings({})
    for key, spec in PAPER_ENCODERS[trainer].items():
        assert getattr(s, key) == spec and not is_untrained_spec(spec)
    stand_ins = [t.__name__ for t in trainer_classes() for k in S.encoder_keys(t.textguided_method)
                 if is_untrained_spec(getattr(t.resolve_settings({}), k))]
    assert not stand_ins  # tiny-* run only when a preset or --set names them


def test_the_tiny_presets_name_their_stand_ins_and_paper_presets_keep_method_keys():
    from nnunet_textguided.presets import available_presets, preset_plans
    from nnunet_textguided.training.tgcnet import TGCNetTrainer
    presets = available_presets()
    assert presets["3d_tiny"]["textguided"]["biclip"] == {"image_encoder": "tiny-pmcclip", "caption_encoder": "tiny-coca"}
    assert set(presets["2d_tiny"]["textguided"]) == {"reclmis", "tgcnet", "mptpn"}
    plans, name = preset_plans("2d_tgcnet_paper")  # the preset's CNN input reaches the settings and the network
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(name)
    s = TGCNetTrainer.resolve_settings(cm.configuration)
    assert s.cnn_input_size == (768, 768)
    assert TGCNetTrainer.textguided_block(pm, cm, s)["cnn_input"] == [768, 768]


def test_legacy_variables_stop_with_the_set_line(monkeypatch):
    S.check_environment()
    monkeypatch.setenv("nnUNet_textguided_image_encoder", "pmcclip:/w/pmc.pth")
    monkeypatch.setenv("nnUNet_textguided_loss_weights", "1,1,0.2,5")
    with pytest.raises(S.SettingsError) as e:
        S.check_environment("nnUNetv2_train")
    msg = str(e.value)
    assert "nnUNet_textguided_image_encoder, nnUNet_textguided_loss_weights are set" in msg
    assert "--set image_encoder=pmcclip:/w/pmc.pth loss_cvr=1 loss_clr=1 loss_ccl=0.2 loss_seg=5" in msg
    monkeypatch.delenv("nnUNet_textguided_image_encoder")
    monkeypatch.delenv("nnUNet_textguided_loss_weights")
    monkeypatch.setenv("nnUNet_textguided_weights", "/somewhere")  # a location: allowed
    S.check_environment()


def test_no_module_but_settings_reads_textguided_variables():
    """Any os.environ / os.getenv read whose key mentions nnUNet_textguided_ outside settings.py is a defect."""
    offenders = []
    for path in sorted((ROOT / "nnunet_textguided").rglob("*.py")) + sorted((ROOT / "trainers").rglob("*.py")):
        if path.name == "settings.py" and path.parent.name == "nnunet_textguided":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Subscript, ast.Call, ast.Compare)) else ""
            if ("environ" in text or "getenv" in text) and S.ENV_PREFIX in text:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text[:80]}")
    assert not offenders, offenders


def test_locations_are_stored_relative_to_the_weights_root(tmp_path, monkeypatch):
    from nnunet_textguided.encoders.registry import portable_spec, resolved_parts
    root = tmp_path / "weights"
    (root / "pmc").mkdir(parents=True)
    (root / "pmc" / "w.pth").write_bytes(b"x")
    monkeypatch.setenv(S.WEIGHTS_ROOT_VARIABLE, str(root))
    assert portable_spec(f"pmcclip:{root}/pmc/w.pth") == "pmcclip:pmc/w.pth"
    assert S.check_value("mptpn", "ppe_weights", str(root / "pmc" / "w.pth")) == "pmc/w.pth"
    monkeypatch.chdir(tmp_path)
    assert portable_spec("pmcclip:./weights/pmc/w.pth") == "pmcclip:pmc/w.pth"  # typed relative to the shell's folder
    assert portable_spec("hf:facebook/dinov2-base") == "hf:facebook/dinov2-base"  # a hub id stays one
    elsewhere = tmp_path / "other"
    monkeypatch.setenv(S.WEIGHTS_ROOT_VARIABLE, str(elsewhere))  # another machine's root
    assert resolved_parts("pmcclip:pmc/w.pth")[1] == str(elsewhere / "pmc" / "w.pth")


def test_docs_settings_page_is_the_schema():
    """docs/settings.md is generated from the schema (`nnunet-textguided settings --markdown`): one place per key."""
    page = (ROOT / "docs" / "settings.md").read_text()
    for m in S.SCHEMAS:
        assert S.describe(m, markdown=True) in page, f"docs/settings.md is out of date for {m}: regenerate it"


def test_settings_file_json_and_yaml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"biclip": {"epochs": 300}}))
    assert S.read_settings_file(tmp_path / "s.json", None) == ("biclip", {"epochs": 300})
    (tmp_path / "s.yaml").write_text("epochs: 300\nstreams: [image]\n")
    assert S.read_settings_file(tmp_path / "s.yaml", "biclip") == ("biclip", {"epochs": 300, "streams": ["image"]})
    with pytest.raises(S.SettingsError, match="holds biclip settings, but the method is cdpdnet"):
        S.read_settings_file(tmp_path / "s.json", "cdpdnet")


def test_ct_window_is_a_setting_rendered_through_the_plans_ct_normalisation():
    from nnunet_textguided.conditioning.slices import window_from_plans
    from nnunet_textguided.presets import preset_plans
    from nnunet_textguided.training.biclip import BiCLIPTrainer
    info = S.keys("biclip")["ct_window_hu"]
    assert info.default == (-175.0, 250.0) and info.paper == "silent" and "replicate each slice" in info.where
    assert S.check_value("biclip", "ct_window_hu", S.parse_text("biclip", "ct_window_hu", "-1000,400")) == [-1000.0,
                                                                                                        400.0]
    plans = {"foreground_intensity_properties_per_channel": {"0": {"mean": 50.0, "std": 100.0}}}
    ct = {"normalization_schemes": ["CTNormalization"]}
    assert window_from_plans(plans, ct) == (-2.25, 2.0)
    assert window_from_plans(plans, ct, (-1000, 400)) == (-10.5, 3.5)
    assert window_from_plans(plans, {"normalization_schemes": ["ZScoreNormalization"]}, (-1000, 400)) == (-2.5, 2.5)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    p, name = preset_plans("3d_tiny", {"spacing": [2.5, 1.25, 1.25], "modality": "CT"})
    pm = PlansManager(p)
    cm = pm.get_configuration(name)
    s = S.resolve("biclip", {"textguided": {"biclip": {"ct_window_hu": [-1000, 400]}}}, {}, "BiCLIPTrainer", "test")
    props = p["foreground_intensity_properties_per_channel"]["0"]
    window = BiCLIPTrainer.settings_for(pm, cm, s)["window"]
    assert window == pytest.approx([(h - props["mean"]) / props["std"] for h in (-1000, 400)])
    with pytest.raises(S.SettingsError, match="ct_window_hu: the lower bound must be below"):
        BiCLIPTrainer.settings_for(pm, cm, S.resolve("biclip", {"textguided": {"biclip": {"ct_window_hu": [400, -1000]}}}, {}, "x", "test"))
