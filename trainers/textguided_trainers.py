"""Trainer names for nnUNet_extTrainer.

nnU-Net imports the modules of this folder under bare names and drops them from sys.modules afterwards,
so the classes live in the installed package and are only re-exported here (they keep
``__module__ = nnunet_textguided.training.*`` and pickle fine for data-loader workers). Every trainer
name that ever reached a checkpoint must stay exported: prediction looks the class up by that name.

nnU-Net's commands import this module to find a trainer: from then on a user error of the package (a setting, a
missing weight file) ends the command with its one-line message instead of a traceback.
"""
from nnunet_textguided.training.biclip import *  # noqa: F401,F403
from nnunet_textguided.training.cdpdnet import *  # noqa: F401,F403
from nnunet_textguided.training.reclmis import *  # noqa: F401,F403
from nnunet_textguided.training.tgcnet import *  # noqa: F401,F403
from nnunet_textguided.training.mptpn import *  # noqa: F401,F403
from nnunet_textguided.training.baselines import *  # noqa: F401,F403

from nnunet_textguided.cli import install_one_line_errors  # noqa: E402

install_one_line_errors()
