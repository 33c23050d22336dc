"""The folder nnUNet_extTrainer points at (`nnunet-textguided env` prints the export line)."""
