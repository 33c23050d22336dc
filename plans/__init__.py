"""Configuration presets (JSON) merged into nnUNetPlans.json by `nnunet-textguided add-config`."""
