"""The headline commands train the paper's models or say within seconds why not: a paper-named trainer on a
configuration without settings asks for the paper's encoders, and a missing weight file, an offline or unreachable
hub stop it before nnU-Net creates anything, with one message (what, where from, where to). add-config validates
before it writes."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import PHANTOM_ID, PHANTOM_NAME, REFERRING_ID, UNIVERSAL_ID, run_cmd
from nnunet_textguided.conditioning.extract import build_trainer
from nnunet_textguided.encoders import save_tiny_encoder
from nnunet_textguided.encoders.base import EncoderSpecError, EncoderUnavailableError
from nnunet_textguided.settings import WEIGHTS_ROOT_VARIABLE, SettingsError

#: the bound of the issue: a command stops within 5 s of its start (measured here from the trainer's construction,
#: which nnUNetv2_train reaches right after importing torch and nnU-Net)
BOUND_S = 5.0


def timed_failure(fn, error=EncoderUnavailableError) -> tuple[str, float]:
    t = time.perf_counter()
    with pytest.raises(error) as e:
        fn()
    return str(e.value), time.perf_counter() - t


def results_folder(dataset: str, trainer: str, configuration: str) -> Path:
    return Path(os.environ["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{configuration}"


def test_biclip_asks_for_the_papers_pmc_clip_weights_and_creates_nothing(phantom_dataset, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ROOT_VARIABLE, raising=False)
    msg, took = timed_failure(lambda: build_trainer(str(PHANTOM_ID), "3d_fullres", "BiCLIPTrainer",
                                                    for_extraction=False))
    assert took < BOUND_S
    assert "BiCLIPTrainer, setting image_encoder: encoder 'pmcclip:pmc-clip/image_encoder(resnet50).pth'" in msg
    assert f"not found at ${WEIGHTS_ROOT_VARIABLE}/pmc-clip/image_encoder(resnet50).pth" in msg  # where to put it
    assert "Get it from the PMC-CLIP release (https://github.com/WeixiongLin/PMC-CLIP" in msg  # where to get it
    assert f"add-config -d {PHANTOM_NAME} 3d_fullres --name NEW_CONFIGURATION --set image_encoder=SPEC" in msg
    assert not results_folder(PHANTOM_NAME, "BiCLIPTrainer", "3d_fullres").exists()


def test_an_offline_hub_is_named_within_seconds(phantom_dataset, tmp_path, monkeypatch):
    save_tiny_encoder("tiny-pmcclip", tmp_path / "pmc-clip")  # the image tower is here: the captioner is next
    monkeypatch.setenv(WEIGHTS_ROOT_VARIABLE, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg, took = timed_failure(lambda: build_trainer(str(PHANTOM_ID), "3d_fullres", "BiCLIPTrainer",
                                                    for_extraction=False))
    assert took < BOUND_S
    assert "setting caption_encoder: encoder 'coca:coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k' needs " \
           "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k from the Hugging Face hub" in msg
    assert "HF_HUB_OFFLINE=1 is set" in msg and "use 'coca:local-dir:<folder>'" in msg
    assert f"{WEIGHTS_ROOT_VARIABLE}={tmp_path}" in msg


@pytest.fixture
def silent_server():
    """A local server that accepts connections and never answers (what a dead proxy or a filtered hub looks
    like); its URL."""
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.parametrize("endpoint", ["silent", "http://127.0.0.1:9"])  # no answer / connection refused
def test_an_unreachable_hub_fails_within_seconds_without_retries(monkeypatch, silent_server, endpoint):
    import huggingface_hub.constants as hub
    from nnunet_textguided.encoders.registry import check_available
    endpoint = silent_server if endpoint == "silent" else endpoint
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "ENDPOINT", endpoint)
    msg, took = timed_failure(lambda: check_available("hf:facebook/dinov2-base"))
    assert took < BOUND_S
    assert f"the hub ({endpoint}) is unreachable" in msg and "hf:facebook/dinov2-base' reads that folder" in msg


@pytest.mark.parametrize("dataset, configuration, trainer, key, spec", [
    (REFERRING_ID, "2d", "RecLMISTrainer", "text_encoder", "openclip:ViT-B-32@openai"),
    (REFERRING_ID, "2d", "MPTPNTrainer", "text_encoder", "hf:bert-base-uncased"),
    (REFERRING_ID, "2d", "TGCNetTrainer", "text_encoder", "openclip:ViT-L-14-336@openai"),
    (UNIVERSAL_ID, "3d_fullres", "CDPDNetTrainer", "text_encoder", "openclip:ViT-B-32@openai"),
])
def test_every_paper_trainer_asks_for_its_papers_encoders(referring_dataset, universal_dataset, monkeypatch, dataset,
                                                          configuration, trainer, key, spec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg, took = timed_failure(lambda: build_trainer(str(dataset), configuration, trainer, for_extraction=False))
    assert took < BOUND_S and f"{trainer}, setting {key}: encoder '{spec}'" in msg and "HF_HUB_OFFLINE=1" in msg


def test_nnunetv2_train_prints_one_line_and_writes_nothing(phantom_dataset):
    folder = results_folder(PHANTOM_NAME, "BiCLIPTrainer", "3d_fullres")
    t = time.perf_counter()
    r = run_cmd("nnUNetv2_train", PHANTOM_ID, "3d_fullres", 0, "-tr", "BiCLIPTrainer", "-device", "cpu", check=False,
                env={WEIGHTS_ROOT_VARIABLE: "", "HF_HUB_OFFLINE": "1"})
    took = time.perf_counter() - t
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("nnUNetv2_train: error: BiCLIPTrainer, setting image_encoder: encoder 'pmcclip:"), last
    assert not folder.exists()
    assert took < 60, took  # the process start (torch, nnU-Net) included; no hub retries


def test_an_open_clip_name_without_weights_is_refused_unless_random_on_purpose():
    from nnunet_textguided.encoders.registry import check_available, load_encoder
    with pytest.raises(EncoderSpecError, match="names no pretrained weights.*'openclip:ViT-B-32\\?random=1'"):
        check_available("openclip:ViT-B-32")
    enc = load_encoder("openclip:ViT-B-32?random=1")
    assert enc.untrained


# -- add-config -----------------------------------------------------------------------------------------------
def plans_file() -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / PHANTOM_NAME / "nnUNetPlans.json"


@pytest.mark.parametrize("args, message", [
    (["3d_tiny", "--method", "biclip", "--set", "colour=red"], "unknown key 'colour'. Valid keys for biclip:"),
    (["3d_tiny", "--method", "biclip", "--set", "epochs=many"], "epochs='many' (add-config): must be a whole number"),
    (["3d_tiny", "--method", "biclip", "--set", "lr=0"], "lr=0.0 (add-config): must be > 0"),
    (["3d_tiny", "--method", "biclip", "--set", "max_tokens=10"], "'max_tokens' is a key of reclmis, tgcnet, mptpn"),
    (["3d_tiny", "--set", "epochs=3"], "name the method of the settings: --method biclip|cdpdnet|reclmis"),
    (["3d_tiny", "--name", "3d_tiny_x", "--method", "biclip", "--set", "image_encoder=pmcclip:/nowhere/w.pth"],
     "setting image_encoder: encoder 'pmcclip:/nowhere/w.pth': the PMC-CLIP image tower"),
    (["3d_tiny", "--name", "3d_tiny_x", "--method", "biclip", "--set", "caption_encoder=openclip:ViT-B-32"], "names no pretrained weights"),
    (["3d_nowhere"], "unknown preset '3d_nowhere'"),
    (["3d_tiny", "--name", "3d_tiny_x", "--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
    (["3d_fullres", "--name", "3d_mine", "--method", "biclip"], "setting image_encoder: encoder 'pmcclip:pmc-clip"),
])
def test_add_config_refuses_bad_settings_and_writes_nothing(phantom_dataset, args, message):
    before = plans_file().read_bytes()
    t = time.perf_counter()
    r = run_cmd("nnunet-textguided", "add-config", "-d", PHANTOM_ID, *args, check=False,
                env={WEIGHTS_ROOT_VARIABLE: "", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert plans_file().read_bytes() == before
    assert time.perf_counter() - t < 60


def test_add_config_with_an_unknown_dataset_fails_in_one_line():
    r = run_cmd("nnunet-textguided", "add-config", "-d", "4242", "3d_tiny", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nnUNetv2_plan_and_preprocess" in r.stderr


def test_add_config_writes_the_block_under_the_users_name_and_keeps_other_methods(phantom_dataset, tmp_path):
    from nnunet_textguided.cli import main
    before = plans_file().read_bytes()
    try:
        assert main(["add-config", "-d", str(PHANTOM_ID), "3d_tiny", "--name", "3d_tiny_mine", "--method", "biclip",
                     "--set", "epochs=3", "streams=image", "fusion_hidden=none"]) == 0
        conf = json.loads(plans_file().read_text())["configurations"]["3d_tiny_mine"]
        assert conf["textguided"]["biclip"] == {"image_encoder": "tiny-pmcclip", "caption_encoder": "tiny-coca",
                                                "epochs": 3, "streams": ["image"], "fusion_hidden": None}
        assert conf["textguided"]["cdpdnet"]["dino_encoder"] == "tiny-dinov2"  # the preset's other method stays
        (tmp_path / "s.yaml").write_text("cdpdnet:\n  slice_pool: 4\n")
        assert main(["add-config", "-d", str(PHANTOM_ID), "3d_tiny", "--name", "3d_tiny_mine", "--settings",
                     str(tmp_path / "s.yaml"), "--force"]) == 0  # the preset's cdpdnet block changes: --force
        conf = json.loads(plans_file().read_text())["configurations"]["3d_tiny_mine"]
        assert conf["textguided"]["biclip"]["epochs"] == 3 and conf["textguided"]["cdpdnet"]["slice_pool"] == 4
        # changing a method's settings under the same name needs --force (a trained model may use that name)
        assert main(["add-config", "-d", str(PHANTOM_ID), "3d_tiny", "--name", "3d_tiny_mine", "--method", "biclip",
                     "--set", "epochs=4"]) == 2
        tr = build_trainer(str(PHANTOM_ID), "3d_tiny_mine", "BiCLIPTrainer_Net2", for_extraction=False)
        assert (tr.num_epochs, tr.settings.streams) == (3, ("image",))
        with pytest.raises(SettingsError, match="BiCLIPTrainer_Net3 is defined by streams="):
            build_trainer(str(PHANTOM_ID), "3d_tiny_mine", "BiCLIPTrainer_Net3", for_extraction=False)
    finally:
        plans_file().write_bytes(before)


def test_paper_presets_carry_the_papers_batch_sizes_and_add_config_changes_it(phantom_dataset):
    """BiCLIP §4.2: "For the Synapse and ACDC datasets, the batch sizes are set at 32 and 16"; --batch_size gives a
    configuration of its own for fewer GPUs."""
    from nnunet_textguided.cli import main
    from nnunet_textguided.presets import available_presets
    presets = available_presets()
    assert presets["3d_nnformer_synapse"]["batch_size"] == 32 and presets["3d_nnformer_acdc"]["batch_size"] == 16
    before = plans_file().read_bytes()
    try:
        assert main(["add-config", "-d", str(PHANTOM_ID), "3d_nnformer_tiny", "--name", "3d_nnformer_tiny_b1",
                     "--batch_size", "1"]) == 0
        assert json.loads(plans_file().read_text())["configurations"]["3d_nnformer_tiny_b1"]["batch_size"] == 1
    finally:
        plans_file().write_bytes(before)


def test_info_describes_what_training_would_use(phantom_dataset, capsys):
    from nnunet_textguided.cli import main
    assert main(["info", "-d", str(PHANTOM_ID), "-c", "3d_tiny", "-tr", "BiCLIPTrainer_Net2"]) == 0
    out = capsys.readouterr().out
    assert "not trained yet" in out and "UNTRAINED ENCODERS: tiny-pmcclip" in out
    from nnunet_textguided.settings import keys
    assert all(f" {k} " in out for k in keys("biclip"))
    assert "* image_encoder" in out  # the preset's stand-in differs from the trainer's (the paper's) default
    assert "  streams" in out and '["image"]' in out  # Net2's own value
    assert "parameters: trainable" in out and "predict: nnUNetv2_predict_textguided -i INPUT_FOLDER" in out
