"""The BiCLIP trainers in-process: frozen encoders stay frozen and outside the checkpoint, gradients reach
only trainable parts, online and offline conditioning agree, and the text/image streams change the output."""
import pytest
import torch

from nnunet_textguided.conditioning.extract import build_trainer
from nnunet_textguided.conditioning.slices import OnlineSliceConditioner, TableSliceConditioner, get_encoder


@pytest.fixture
def trainer(phantom_dataset):
    from conftest import PHANTOM_ID

    def make(name):
        tr = build_trainer(str(PHANTOM_ID), "3d_tiny", name, for_extraction=False)
        tr.initialize()
        return tr
    return make


def encoders_of(net):
    return [get_encoder(s.encoder) for s in net.conditioner.streams]


def test_frozen_encoders_get_no_gradient_and_stay_out_of_checkpoints(trainer):
    tr = trainer("BiCLIPTrainer_online")
    net = tr.network
    assert isinstance(net.conditioner, OnlineSliceConditioner)
    encs = encoders_of(net)
    enc_params = {id(p) for e in encs for p in e.parameters()}
    assert enc_params and not enc_params & {id(p) for p in net.parameters()}
    assert not enc_params & {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    sd_sizes = {tuple(v.shape) for v in net.state_dict().values()}
    assert all(not k.startswith("_") for k in net.state_dict())
    x = torch.randn(2, 1, *tr.configuration_manager.patch_size)
    target = [torch.randint(0, 4, (2, 1, *[s // f for s, f in zip(x.shape[2:], sc)])).float()
              for sc in [[1, 1, 1], [1, 2, 2], [2, 4, 4]]]
    net.train()
    out = net(x)
    tr.loss(out, target).backward()
    assert all(e.training is False for e in encs)
    assert all(p.grad is None and not p.requires_grad for e in encs for p in e.parameters())
    for name, adapter in net.adapters.items():
        assert adapter.mlp[0].weight.grad.abs().sum() > 0, name
    assert sd_sizes  # the state dict exists and holds only the trainable network


def test_conditioning_changes_the_output(trainer):
    tr = trainer("BiCLIPTrainer_online")
    net = tr.network.eval()
    x = torch.randn(1, 1, *tr.configuration_manager.patch_size)
    with torch.no_grad():
        y = net(x)[0]
        real = net.conditioner
        _, emb = real(x)
        net.set_conditioner(lambda t: (t, {k: v.flip(1) for k, v in emb.items()}))
        y_flipped_text = net(x)[0]
        net.set_conditioner(real)
    assert not torch.allclose(y, y_flipped_text)


def test_offline_tables_equal_online_embeddings(trainer):
    """Consistency rule: a full slice is embedded identically by the online and the paper-mode path."""
    online = trainer("BiCLIPTrainer_online").network.conditioner
    offline = trainer("BiCLIPTrainer").network.conditioner
    assert isinstance(offline, TableSliceConditioner)
    vol = torch.randn(1, 12, 32, 32) * 2
    tables = offline.compute_tables(vol)
    _, emb = online(vol[None])
    for name in ("image", "caption"):
        torch.testing.assert_close(tables[name][1:], emb[name][0], atol=1e-5, rtol=1e-4)
        assert tables[name].shape[0] == 13  # + the outside-the-volume row


def test_paper_mode_network_reads_the_store(trainer):
    tr = trainer("BiCLIPTrainer")
    tr.extract(progress=False)
    tr._register_tables()
    cond = tr.network.conditioner
    cases = tr.all_case_identifiers()
    assert set(cond.tables) == set(range(len(cases)))
    ds = tr.dataset_class(tr.preprocessed_dataset_folder, cases[:1])
    data = torch.from_numpy(ds.load_case(cases[0])[0][:])  # with positional channels
    assert data.shape[0] == 3
    fresh = cond.compute_tables(data[:1])
    for name, t in cond.tables[0].items():
        torch.testing.assert_close(t, fresh[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset, weights", [("3d_nnformer_tiny", (4 / 7, 2 / 7, 1 / 7)), ("3d_nnformer_acdc", None)])
def test_nnformer_schedule_and_deep_supervision(preset, weights, monkeypatch):
    """BiCLIP's schedule on nnFormer: 500 epochs, nnFormer's output weights 1:1/2:1/4 (nnU-Net would drop the
    coarsest), no deep supervision where nnFormer has none (ACDC)."""
    from nnunet_textguided.presets import preset_plans
    from nnunet_textguided.training.biclip import nnFormerTrainer
    plans, name = preset_plans(preset, {"spacing": [2.5, 1.25, 1.25], "modality": "CT"})
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
    plans["continue_training"] = False  # set by nnUNetv2_train's run_training
    tr = nnFormerTrainer(plans, name, 0, dataset_json, device=torch.device("cpu"))
    assert tr.num_epochs == 500
    plans, name = preset_plans(preset, {"spacing": [2.5, 1.25, 1.25], "modality": "CT"})
    plans["configurations"][name]["textguided"]["biclip"]["epochs"] = 120  # add-config --set epochs=120
    plans["continue_training"] = False
    assert nnFormerTrainer(plans, name, 0, dataset_json, device=torch.device("cpu")).num_epochs == 120
    assert tr.enable_deep_supervision == (weights is not None)
    loss = tr._build_loss()
    if weights is None:
        assert not hasattr(loss, "weight_factors")
    else:
        assert loss.weight_factors == pytest.approx(weights)


class PickledObject:
    """Stands for what nnFormer's .model files pickle besides tensors (numpy objects, trainer state)."""


def test_nnformer_checkpoint_initialises_backbone_and_fused_layers(tmp_path, monkeypatch):
    """Setting nnformer_weights: an nnFormer checkpoint (authors' key names, 'module.' prefix) loads
    into the backbone, the report lists what did not load, and the fused layers restart from the loaded layer."""
    from nnunet_textguided.presets import preset_plans
    from nnunet_textguided.training.biclip import BiCLIPTrainer
    plans, name = preset_plans("3d_nnformer_tiny", {"spacing": [2.5, 1.25, 1.25], "modality": "CT"})
    plans["continue_training"] = False
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
    tr = BiCLIPTrainer(plans, name, 0, dataset_json, device=torch.device("cpu"))
    tr.network = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 2, True)
    torch.manual_seed(1)
    other = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 2, True).backbone
    theirs = {"module." + k.replace("encoder.", "model_down.", 1).replace("decoder.final.", "final.", 1): v
              for k, v in other.state_dict().items()}
    theirs["module.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": theirs}, tmp_path / "nnformer.model")
    report = tr.load_nnformer_weights(str(tmp_path / "nnformer.model"))
    assert report["unexpected"] == ["module.extra.weight"] and not report["missing"] and not report["shape_mismatch"]
    for (k, v), w in zip(tr.network.backbone.state_dict().items(), other.state_dict().values()):
        assert torch.equal(v, w), k
    last = tr.network.backbone.bottleneck_blocks()[-1].state_dict()
    assert all(torch.equal(v, last[k]) for k, v in tr.network.attention[0].state_dict().items())
    # a file pickling other objects is refused (weights_only) unless the user declares it trusted
    from nnunet_textguided.io import UnsafeCheckpointError
    torch.save({"state_dict": theirs, "trainer": PickledObject()}, tmp_path / "pickled.model")
    with pytest.raises(UnsafeCheckpointError, match="could run code .*nnformer_weights_trusted=true"):
        tr.load_nnformer_weights(str(tmp_path / "pickled.model"))
    assert tr.load_nnformer_weights(str(tmp_path / "pickled.model"), trusted=True)["matched"] == report["matched"]


@pytest.mark.parametrize("name", ["BiCLIPTrainer", "BiCLIPTrainer_online"])
def test_compiled_network_trains_without_tracing_the_frozen_encoders(phantom_dataset, name, monkeypatch):
    """nnU-Net compiles the network on GPUs (initialize: torch.compile(self.network)); that path, run here with
    the eager backend: the compiled network trains and predicts like the eager one, the frozen encoders (and
    CoCa's generation) run outside every traced graph in online mode, and paper mode calls no encoder at all."""
    import functools

    from conftest import PHANTOM_ID
    from nnunet_textguided.encoders.base import FrozenEncoder
    compile_eagerly = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    tr = build_trainer(str(PHANTOM_ID), "3d_tiny", name, for_extraction=False)
    monkeypatch.setattr(type(tr), "_do_i_compile", lambda self: True)
    tr.initialize()
    assert hasattr(tr.network, "_orig_mod")  # nnU-Net's own compile call wrapped it
    paper = name == "BiCLIPTrainer"
    if paper:
        tr._register_tables()
    calls = []
    for method in ("embed_images", "embed_captions"):
        original = getattr(FrozenEncoder, method)

        def recording(self, *a, _original=original, **k):
            calls.append(torch.compiler.is_compiling())
            return _original(self, *a, **k)
        monkeypatch.setattr(FrozenEncoder, method, recording)
    torch.manual_seed(0)
    patch = tr.configuration_manager.patch_size
    x = torch.randn(2, 1, *patch)
    if paper:  # the loader's positional channels: case 0 and 1, slices 1..D of each
        from nnunet_textguided.data.position_channels import append_position_channels
        x = torch.stack([append_position_channels(x[i], i) for i in range(2)])
    target = [torch.randint(0, 4, (2, 1, *[s // f for s, f in zip(patch, sc)])).float()
              for sc in [[1, 1, 1], [1, 2, 2], [2, 4, 4]]]
    result = tr.train_step({"data": x, "target": target})
    assert torch.isfinite(torch.tensor(result["loss"]))
    tr.network.eval()
    with torch.no_grad():
        compiled, eager = tr.network(x)[0], tr.bare_network()(x)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    if paper:
        assert calls == []
    else:
        assert calls and not any(calls)  # called, and never while dynamo traced
