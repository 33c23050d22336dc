"""Runs in a spawned child (imports nothing from conftest, so the child sets no session folders)."""


def load_in_child(ds, transforms, key):
    import torch
    data = ds.load_case(key)[0]
    out = transforms(image=torch.from_numpy(data[:]), segmentation=torch.zeros((1, *data.shape[1:]), dtype=torch.int16))
    return tuple(out["image"].shape)
