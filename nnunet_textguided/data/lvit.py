"""Convert an LViT-format dataset (QaTa-COV19, MosMedData+, MoNuSeg with text annotations) to an nnU-Net v2 raw
2D dataset with one note per case.

``nnunet-textguided convert-lvit SRC -d ID --name NAME`` (also ``python -m nnunet_textguided.data.lvit``) reads
an LViT task folder and writes ``nnUNet_raw/DatasetXXX_NAME``; stock ``nnUNetv2_plan_and_preprocess -d ID -c 2d
--verify_dataset_integrity`` accepts it. Nothing but pandas/openpyxl (the tables), Pillow and numpy is needed:
no BERT, MXNet or torch.

Source layout (HUANGLIZI/LViT, ``datasets/<Task>/``)::

    SRC/Train_Folder/img/           images
    SRC/Train_Folder/labelcol/      masks
    SRC/Train_Folder/Train_text.xlsx first sheet: columns "Image" (the mask file name) and "Description"
    SRC/Val_Folder/...              same (Val_text.xlsx); required with --val-split fold
    SRC/Test_Folder/...             same (Test_text.xlsx); optional

The table of a split folder is its single ``*_text.xlsx`` file, else its single ``*.xlsx`` file (Excel lock
files ``~$*`` are ignored); several candidates are an error. Column names are matched ignoring case and
surrounding spaces. The "Image" key names the mask in LViT's tables (LViT looks the text up by the mask file
name); the image's file name, either name without its extension, or a name with a leading folder are accepted
too.

Pairing images and masks (per split, any of .png .jpg .jpeg .bmp .tif .tiff): an image ``<stem>.<ext>`` pairs
with the mask ``<stem>.<ext>`` or ``mask_<stem>.<ext>`` in ``labelcol/``, which covers the three LViT datasets:
QaTa-COV19 (``covid_1.png`` / ``mask_covid_1.png``), MosMedData+ (same name) and MoNuSeg (``TCGA-….tif`` RGB
image / ``TCGA-….png`` mask). Every problem of the source is collected and reported at once, naming the files
and rows: an image without a mask, a mask without an image, an image that could pair with two masks, two
images with the same stem, image/mask size mismatches, table rows naming no image, rows without an Image name,
conflicting duplicate rows, and images without a note. Every case needs its note (the text-guided trainers
read it for every case, in training and at inference): an image without a row or with an empty Description is
an error whose fix is to add the row, or to remove the image and its mask.

Output (nnU-Net v2 raw, 2D natural-image format read by ``NaturalImage2DIO``)::

    DatasetXXX_NAME/
        dataset.json                 channel_names, labels {background: 0, <label-name>: 1}, ".png", ...
        imagesTr/<CASE>_0000.png     Train_Folder cases (and Val_Folder cases, see Split below)
        imagesTr/<CASE>.txt          the note: the Description, whitespace collapsed, UTF-8, one trailing newline
                                     (all of it; LViT's loader embeds the text up to its first line break)
        labelsTr/<CASE>.png          uint8 mask, 0/1
        imagesTs/, labelsTs/         Test_Folder cases, same naming
        splits_final.json            with --val-split fold only
        lvit_source.json             case -> split, original image/mask, table and row, note; conversion settings

Images
    uint8. Grayscale images (QaTa-COV19, MosMedData+; also RGB files whose three channels are equal) are written
    as one channel ``"0": "gray"``. Colour images (MoNuSeg) are written as one RGB PNG per case,
    ``<CASE>_0000.png``, with ``channel_names`` ``{"0": "R", "1": "G", "2": "B"}``: nnU-Net's ``NaturalImage2DIO``
    reads an RGB PNG as three channels from the one file (it moves the colour axis to the front), and its
    integrity check counts channels after reading, so this is nnU-Net's own convention for RGB data (its
    Dataset120_RoadSegmentation converter does the same). It also keeps a new case for prediction in the form
    it arrives in (one RGB PNG, no splitting into ``_0001``/``_0002`` files). ``--channels auto`` (default)
    chooses RGB when any image of any split is colour (grayscale images of such a dataset are replicated to
    three channels, nnU-Net needs one channel count); ``gray`` converts colour images to luminance (ITU-R 601),
    ``rgb`` forces three channels. 16-bit images are reduced to 8 bits by dropping the low byte, as OpenCV's
    ``imread`` (LViT's reader) does; an alpha channel is dropped. None of these channel names is an nnU-Net
    normalisation scheme name, so nnU-Net z-scores each channel per image.

Masks
    Binarised: any value > 0 (in any colour channel) -> 1, as LViT does; label name ``lesion`` (``--label-name``).
    An image and its mask must have the same size.

Size
    Default: the original size. nnU-Net plans patch size and network from the data and handles images of
    different sizes, and predictions then stay in the geometry of the original masks. ``--size 224`` reproduces
    LViT's preprocessing (every image and mask resized to 224 x 224, as the papers' metrics were computed):
    images bilinear (Pillow, antialiased when shrinking), masks binarised first and then nearest neighbour.
    (LViT resizes masks bilinearly and thresholds > 0, which grows them by up to a pixel; nearest does not.)

Case names
    The sanitised image stem: characters other than letters, digits and ``-`` become ``_`` (runs collapsed,
    leading/trailing ``_``/``-`` removed), a trailing ``_dddd`` becomes ``-dddd`` so that no case id looks like a
    channel suffix (``x_0001`` -> ``x-0001``), an empty result becomes ``case``; names that collide after
    sanitising (across all splits, in Train, Val, Test order, files sorted) get ``-2``, ``-3``, ... .
    ``lvit_source.json`` maps every case back to its original files.

Split (``--val-split``)
    ``fold`` (default): Val_Folder cases go to imagesTr beside the Train_Folder cases, and
    ``splits_final.json`` makes LViT's split nnU-Net's fold 0 (train = Train cases, val = Val cases): train with
    ``nnUNetv2_train ID 2d 0``. nnU-Net's trainer reads the split from ``nnUNet_preprocessed/<Dataset>/
    splits_final.json`` (``nnUNetTrainer.do_split``); that folder does not exist before planning, so the file is
    written into the raw dataset folder, from where stock ``nnUNetv2_plan_and_preprocess`` (the experiment
    planner's constructor, ``_maybe_copy_splits_file``) copies it into the preprocessed folder; preprocessing
    only replaces the configuration's data folder, never the split file. There is no fold 1-4 (nnU-Net would
    fall back to a random 80:20 split for them). ``merge``: Val_Folder cases join the training cases and
    nnU-Net makes its own 5-fold cross-validation; no split file is written.

    A ``splits_final.json`` already in ``nnUNet_preprocessed/<Dataset>/`` (from an earlier conversion or
    training) that disagrees with the new one would make stock planning stop (its split check asserts) or
    training use stale case names. It is detected before anything is written: an error without
    ``--overwrite``; with ``--overwrite`` it is replaced by the new split (fold) or removed (merge). An
    identical one is left alone.

The dataset is assembled in a hidden staging folder and renamed into place (nnunet_textguided.io), so it
appears complete or not at all; an existing dataset is only replaced with ``--overwrite``. All checks of the
source run before anything is written: a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_write_json, staged_dataset_folder

__all__ = ["LViTFormatError", "SourceCase", "find_text_table", "read_text_table", "scan_lvit_folder",
           "sanitise_case_id", "convert_lvit", "main"]

FILE_ENDING = ".png"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
MASK_PREFIX = "mask_"
CHANNEL_MODES = ("auto", "gray", "rgb")
VAL_SPLITS = ("fold", "merge")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}
_COLOUR_MODES = {"P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}
_MAX_LISTED = 10


class LViTFormatError(ValueError):
    """The source folder does not follow the LViT format (the message names the files and the fix)."""


@dataclass
class SourceCase:
    """One image of the source with its mask and note; ``row`` is the Excel row number (header = row 1)."""

    split: str  # train | val | test
    image: Path
    mask: Path
    note: str = ""
    table: Path | None = None
    row: int = 0
    case_id: str = ""


# ----------------------------------------------------------------------------------------------------------
# reading the source
# ----------------------------------------------------------------------------------------------------------
def find_text_table(split_dir: str | os.PathLike) -> Path:
    """The text table of an LViT split folder: its single ``*_text.xlsx``, else its single ``*.xlsx``."""
    split_dir = Path(split_dir)
    found = sorted(p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() == ".xlsx"
                   and not p.name.startswith(("~$", ".")))
    text = [p for p in found if p.name.lower().endswith("_text.xlsx")]
    if len(text) == 1:
        return text[0]
    if not found:
        raise LViTFormatError(f"{split_dir}: no text table (*.xlsx) found; LViT names it {split_dir.name.split('_')[0]}"
                              "_text.xlsx (first sheet, columns 'Image' and 'Description')")
    if len(found) == 1 and not text:
        return found[0]
    names = ", ".join(p.name for p in (text or found))
    raise LViTFormatError(f"{split_dir}: ambiguous text table, several candidates: {names}. Keep one "
                          f"(LViT names it {split_dir.name.split('_')[0]}_text.xlsx) and move the others away")


def _cell_text(value) -> str:
    """A table cell as text ('' for empty): numbers without a spurious '.0'."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value)


def read_text_table(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """Rows of an LViT text table as (Excel row number, Image key, normalised Description)."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_excel(path, sheet_name=0, dtype=object, engine="openpyxl")
    except Exception as e:  # openpyxl raises several kinds for a broken file
        raise LViTFormatError(f"{path}: cannot read it as an Excel workbook ({type(e).__name__}: {e})") from None
    columns = {str(c).strip().lower(): c for c in df.columns}
    missing = [c for c in ("image", "description") if c not in columns]
    if missing:
        raise LViTFormatError(f"{path}: the first sheet needs the columns 'Image' (mask file name) and "
                              f"'Description' (the text); found {[str(c) for c in df.columns]}")
    rows = []
    for i, (key, desc) in enumerate(zip(df[columns["image"]], df[columns["description"]])):
        rows.append((i + 2, _cell_text(key).strip(), " ".join(_cell_text(desc).split())))
    return rows


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (IMAGE_EXTENSIONS, any case), sorted; hidden files (._* of macOS) skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _strip_ext(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in IMAGE_EXTENSIONS else name


def _look_up(name: str, by_name: dict, by_stem: dict):
    """(found, value) for a table key: the file name, else its stem; each also without a leading ``mask_``."""
    for look_up, k in ((by_name, name), (by_stem, _strip_ext(name))):
        for candidate in (k, k[len(MASK_PREFIX):] if k.startswith(MASK_PREFIX) else None):
            if candidate is not None and candidate in look_up:
                return True, look_up[candidate]
    return False, None


def _scan_split(split_dir: Path, split: str, problems: list[str]) -> list[SourceCase]:
    """Pair the images and masks of one split folder and attach the notes; problems are appended."""
    where = split_dir.name
    img_dir, mask_dir = split_dir / "img", split_dir / "labelcol"
    missing = [d.name + "/" for d in (img_dir, mask_dir) if not d.is_dir()]
    if missing:
        problems.append(f"{where}: missing {' and '.join(missing)} (LViT layout: img/ images, labelcol/ masks)")
        return []
    try:
        table = find_text_table(split_dir)
    except LViTFormatError as e:
        problems.append(str(e))
        table = None
    images, masks = image_files(img_dir), image_files(mask_dir)
    if not images:
        problems.append(f"{where}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in {img_dir}")

    def by_stem(files: list[Path], folder: str) -> dict[str, Path]:
        out: dict[str, list[Path]] = {}
        for f in files:
            out.setdefault(f.stem, []).append(f)
        for stem, fs in out.items():
            if len(fs) > 1:
                problems.append(f"{where}: several files with the stem '{stem}' in {folder}/: "
                                f"{_listed([f.name for f in fs])}; keep one")
        return {stem: fs[0] for stem, fs in out.items()}

    image_by_stem, mask_by_stem = by_stem(images, "img"), by_stem(masks, "labelcol")
    cases, used_masks, no_mask, two_masks = [], set(), [], []
    for stem, image in image_by_stem.items():
        candidates = [mask_by_stem[s] for s in (stem, MASK_PREFIX + stem) if s in mask_by_stem]
        if not candidates:
            no_mask.append(f"img/{image.name} (no labelcol/{stem}.* nor labelcol/{MASK_PREFIX}{stem}.*)")
        elif len(candidates) > 1:
            two_masks.append(f"img/{image.name} ({' and '.join('labelcol/' + m.name for m in candidates)})")
        else:
            used_masks.add(candidates[0])
            cases.append(SourceCase(split, image, candidates[0], table=table))
    if no_mask:
        problems.append(f"{where}: {len(no_mask)} image(s) without a mask in labelcol/: {_listed(no_mask)}. "
                        "Add the masks or remove these images (and their table rows)")
    if two_masks:
        problems.append(f"{where}: {len(two_masks)} image(s) match two masks: {_listed(two_masks)}; keep one")
    no_image = [f"labelcol/{m.name}" for m in mask_by_stem.values() if m not in used_masks]
    if no_image:
        problems.append(f"{where}: {len(no_image)} mask(s) without an image in img/ (expected the mask's stem, "
                        f"without a leading {MASK_PREFIX!r} if present): {_listed(no_image)}. Add the images or "
                        "remove these masks (and their table rows)")

    # image/mask sizes (header only, no decoding)
    from PIL import Image
    mismatched = []
    for c in cases:
        try:
            with Image.open(c.image) as im, Image.open(c.mask) as mk:
                if im.size != mk.size:
                    mismatched.append(f"img/{c.image.name} {im.size[0]}x{im.size[1]} vs labelcol/{c.mask.name} "
                                      f"{mk.size[0]}x{mk.size[1]}")
        except OSError as e:
            problems.append(f"{where}: cannot read {e.filename or c.image.name}: {e}")
    if mismatched:
        problems.append(f"{where}: {len(mismatched)} image/mask pair(s) of different sizes (width x height): "
                        f"{_listed(mismatched)}")

    if table is None:
        return cases
    try:
        rows = read_text_table(table)
    except LViTFormatError as e:
        problems.append(str(e))
        return cases
    # rows naming an unpaired image or mask (already reported above) are not reported again
    paired = used_masks | {c.image for c in cases}
    unpaired = [f for f in [*image_by_stem.values(), *mask_by_stem.values()] if f not in paired]
    by_name: dict[str, SourceCase | None] = {f.name: None for f in unpaired}
    by_key_stem: dict[str, SourceCase | None] = {f.stem: None for f in unpaired}
    for c in cases:
        by_name[c.image.name] = by_name[c.mask.name] = c
        for s in (c.image.stem, c.mask.stem):
            by_key_stem[s] = c
    unmatched, no_key, conflicting = [], [], []
    for row, key, desc in rows:
        if not key:
            if desc:
                no_key.append(f"row {row}")
            continue  # an entirely empty row: ignored
        found, case = _look_up(re.split(r"[\\/]", key)[-1], by_name, by_key_stem)
        if not found:
            unmatched.append(f"row {row} '{key}'")
        elif case is None:
            continue  # names an image without a mask or a mask without an image: reported above
        elif not desc:
            continue  # reported below as an image without a note unless another row gives one
        elif case.note and case.note != desc:
            conflicting.append(f"rows {case.row} and {row} ('{key}')")
        elif not case.note:
            case.note, case.row = desc, row
    if no_key:
        problems.append(f"{where}/{table.name}: {len(no_key)} row(s) with a Description but no Image name: {_listed(no_key)}. "
                        "Fill in the Image column (the mask file name)")
    if unmatched:
        problems.append(f"{where}/{table.name}: {len(unmatched)} row(s) name no image in img/ nor mask in labelcol/: "
                        f"{_listed(unmatched)}. Correct the Image name (LViT: the mask file name) or add the image "
                        "and its mask")
    if conflicting:
        problems.append(f"{where}/{table.name}: {len(conflicting)} case(s) with two different Descriptions: "
                        f"{_listed(conflicting)}. Keep one row per image")
    without = [f"img/{c.image.name} (mask labelcol/{c.mask.name})" for c in cases if not c.note]
    if without:
        problems.append(f"{where}: {len(without)} image(s) without a note in {table.name}: {_listed(without)}. "
                        "Every case needs its note (the text-guided models read it in training and at inference): "
                        f"add a row to {table.name} with Image = the mask file name and Description = the text, "
                        "or remove the image and its mask")
    return cases


def sanitise_case_id(stem: str) -> str:
    """An nnU-Net-safe case id from a file stem (rules in the module docstring)."""
    s = re.sub(r"[^A-Za-z0-9-]+", "_", stem)
    s = re.sub(r"_+", "_", s).strip("_-")
    s = re.sub(r"_(\d{4})$", r"-\1", s)
    return s or "case"


def scan_lvit_folder(src: str | os.PathLike, val_split: str = "fold") -> list[SourceCase]:
    """Every case of an LViT task folder with its note and case id; LViTFormatError listing all problems."""
    src = Path(src)
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split must be one of {VAL_SPLITS}, got {val_split!r}")
    if not src.is_dir():
        raise LViTFormatError(f"{src}: source folder not found")
    if not (src / SPLIT_FOLDERS["train"]).is_dir():
        present = sorted(p.name for p in src.iterdir() if p.is_dir())
        raise LViTFormatError(f"{src}: no {SPLIT_FOLDERS['train']}/ (found {present}); SRC must be an LViT task "
                              "folder holding Train_Folder/, Val_Folder/ and Test_Folder/, each with img/, "
                              "labelcol/ and its *_text.xlsx")
    if val_split == "fold" and not (src / SPLIT_FOLDERS["val"]).is_dir():
        raise LViTFormatError(f"{src}: no {SPLIT_FOLDERS['val']}/, which --val-split fold turns into nnU-Net's fold 0; "
                              "add it, or pass --val-split merge to use nnU-Net's own 5-fold cross-validation")
    problems: list[str] = []
    cases: list[SourceCase] = []
    for split, folder in SPLIT_FOLDERS.items():
        if (src / folder).is_dir():
            cases += _scan_split(src / folder, split, problems)
    if problems:
        raise LViTFormatError(f"{src} is not a valid LViT dataset ({len(problems)} problem(s)):\n  - "
                              + "\n  - ".join(problems))
    taken: set[str] = set()
    for c in cases:
        base = sanitise_case_id(c.image.stem)
        cid, k = base, 1
        while cid.lower() in taken:  # case-insensitive file systems
            k += 1
            cid = f"{base}-{k}"
        taken.add(cid.lower())
        c.case_id = cid
    return cases


# ----------------------------------------------------------------------------------------------------------
# images and masks
# ----------------------------------------------------------------------------------------------------------
def _load_image(path: Path) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("1", "LA"):
            return np.asarray(im.convert("L"))
        if mode == "L":
            return np.asarray(im)
        if mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale
            a = np.asarray(im)
            if a.size and (a.min() < 0 or a.max() > 65535):
                raise LViTFormatError(f"{path}: integer image with values outside 0..65535; save it as 8-bit")
            return (a.astype(np.uint32) >> 8).astype(np.uint8)
        if mode in _COLOUR_MODES:
            return np.asarray(im.convert("RGB"))
    raise LViTFormatError(f"{path}: unsupported image mode {mode!r}; save it as 8-bit grayscale or RGB")


def _is_colour(arr: np.ndarray) -> bool:
    return arr.ndim == 3 and not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]))


def _probe_colour(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in _GRAY_MODES:
            return False
    return _is_colour(_load_image(path))


def _to_channels(arr: np.ndarray, rgb: bool) -> np.ndarray:
    from PIL import Image

    if rgb:
        return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr
    if arr.ndim == 2:
        return arr
    return arr[..., 0].copy() if not _is_colour(arr) else np.asarray(Image.fromarray(arr).convert("L"))


def _load_mask(path: Path) -> np.ndarray:
    """uint8 (H, W) in {0, 1}: any value > 0 in any colour channel is foreground (alpha ignored)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., :3] if a.shape[2] >= 3 else a[..., :1]
        a = a.max(axis=2)
    return (a > 0).astype(np.uint8)


def _resize(arr: np.ndarray, size: int | None, mask: bool) -> np.ndarray:
    if size is None or arr.shape[:2] == (size, size):
        return arr
    from PIL import Image

    return np.asarray(Image.fromarray(arr).resize((size, size), Image.NEAREST if mask else Image.BILINEAR))


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    # plain write: the whole dataset lives in a staging folder that is renamed into place only when complete
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG")


# ----------------------------------------------------------------------------------------------------------
# the split file
# ----------------------------------------------------------------------------------------------------------
def _split_matches(existing, new) -> bool:
    """What nnU-Net's planner checks (_maybe_copy_splits_file): every fold of ``new`` equals ``existing``'s."""
    try:
        return len(existing) >= len(new) and all(
            set(existing[i]["train"]) == set(new[i]["train"]) and set(existing[i]["val"]) == set(new[i]["val"])
            for i in range(len(new)))
    except (TypeError, KeyError, IndexError):
        return False


def _merge_split_ok(existing, training_cases: set[str]) -> bool:
    """A split file kept in merge mode: a cross-validation (several folds) over exactly the training cases."""
    try:
        return len(existing) > 1 and all(set(f["train"]) | set(f["val"]) == training_cases for f in existing)
    except (TypeError, KeyError):
        return False


def _preprocessed_split_action(pre_split: Path | None, val_split: str, splits, training_cases: set[str],
                               overwrite: bool) -> str | None:
    """None (nothing to do), "replace" or "remove" for an existing preprocessed split file; error if stale."""
    if pre_split is None or not pre_split.is_file():
        return None
    try:
        existing = json.loads(pre_split.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        existing = None
    if val_split == "fold" and _split_matches(existing, splits):
        return None
    if val_split == "merge" and _merge_split_ok(existing, training_cases):
        return None
    if not overwrite:
        what = ("does not hold LViT's split of the new cases (train = Train_Folder, val = Val_Folder)"
                if val_split == "fold" else "is not a cross-validation of the new training cases")
        raise FileExistsError(f"{pre_split} (from an earlier conversion or training) {what}: stock planning would "
                              "stop on it and training would use it. Remove it, or pass --overwrite to "
                              + ("replace it" if val_split == "fold" else "remove it"))
    return "replace" if val_split == "fold" else "remove"


# ----------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------
def convert_lvit(src: str | os.PathLike, dataset_id: int, name: str, raw_root: str | os.PathLike | None = None,
                 val_split: str = "fold", size: int | None = None, channels: str = "auto",
                 label_name: str = "lesion", overwrite: bool = False,
                 preprocessed_root: str | os.PathLike | None = None, log=print) -> Path:
    """Convert the LViT task folder ``src`` into ``raw_root/DatasetXXX_name``; return that folder.

    ``raw_root`` defaults to nnU-Net's ``nnUNet_raw``, ``preprocessed_root`` (only consulted for a stale
    ``splits_final.json``) to ``$nnUNet_preprocessed``. Everything is checked before anything is written.
    """
    dataset_id = int(dataset_id)
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name or ""):
        raise ValueError(f"name must be letters, digits, '_' or '-' (no spaces or slashes), got {name!r}")
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split must be one of {VAL_SPLITS}, got {val_split!r}")
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")
    if size is not None and not 8 <= int(size) <= 8192:
        raise ValueError(f"size must be in 8..8192 pixels, got {size}")
    size = None if size is None else int(size)
    label_name = " ".join(str(label_name).split())
    if not label_name or label_name.lower() == "background":
        raise ValueError(f"label name must be non-empty and not 'background', got {label_name!r}")
    if raw_root is None:
        from nnunetv2.paths import nnUNet_raw
        if nnUNet_raw is None:
            raise ValueError("nnUNet_raw is not set; export it or pass --raw-root")
        raw_root = nnUNet_raw
    raw_root = Path(raw_root).expanduser().resolve()
    if preprocessed_root is None and os.environ.get("nnUNet_preprocessed"):
        preprocessed_root = os.environ["nnUNet_preprocessed"]
    src = Path(src).expanduser().resolve()
    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    target = raw_root / dataset_name
    if target.exists() and not overwrite:  # early, before reading the source (checked again when moving)
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")

    cases = scan_lvit_folder(src, val_split)
    training = [c for c in cases if c.split in ("train", "val")]
    if not [c for c in cases if c.split == "train"]:
        raise LViTFormatError(f"{src / SPLIT_FOLDERS['train']}: no training cases")
    if val_split == "fold" and not [c for c in cases if c.split == "val"]:
        raise LViTFormatError(f"{src / SPLIT_FOLDERS['val']}: no validation cases for --val-split fold; add them "
                              "or pass --val-split merge")
    splits = [{"train": sorted(c.case_id for c in cases if c.split == "train"),
               "val": sorted(c.case_id for c in cases if c.split == "val")}] if val_split == "fold" else None
    pre_split = Path(preprocessed_root) / dataset_name / "splits_final.json" if preprocessed_root else None
    split_action = _preprocessed_split_action(pre_split, val_split, splits, {c.case_id for c in training},
                                              overwrite)

    lossy = [str(c.mask.relative_to(src)) for c in cases if c.mask.suffix.lower() in (".jpg", ".jpeg")]
    if lossy:
        log(f"warning: {len(lossy)} JPEG mask(s) ({_listed(lossy)}): compression noise > 0 becomes foreground "
            "(as in LViT); lossless masks (PNG) are safer")
    # channels: decided for the whole dataset (nnU-Net needs one channel count), before writing anything
    if channels == "auto":
        n_colour = sum(_probe_colour(c.image) for c in cases)
        rgb = n_colour > 0
        if rgb and n_colour < len(cases):
            log(f"{n_colour} of {len(cases)} images are colour: writing all as RGB (grayscale ones replicated)")
    else:
        rgb = channels == "rgb"
    channel_names = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "gray"}

    source = {}
    with staged_dataset_folder(raw_root, dataset_id, dataset_name, overwrite) as staging:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / sub).mkdir()
        for c in cases:
            tag = "Ts" if c.split == "test" else "Tr"
            image = _resize(_to_channels(_load_image(c.image), rgb), size, mask=False)
            mask = _resize(_load_mask(c.mask), size, mask=True)
            _save_png(staging / f"images{tag}" / f"{c.case_id}_0000{FILE_ENDING}", image)
            _save_png(staging / f"labels{tag}" / f"{c.case_id}{FILE_ENDING}", mask)
            (staging / f"images{tag}" / f"{c.case_id}.txt").write_text(c.note + "\n", encoding="utf-8")
            source[c.case_id] = {"split": c.split, "image": str(c.image.relative_to(src)),
                                 "mask": str(c.mask.relative_to(src)), "table": str(c.table.relative_to(src)),
                                 "row": c.row, "note": c.note}
        settings = {"source": str(src), "val_split": val_split, "size": size, "channels": "rgb" if rgb else "gray",
                    "label_name": label_name,
                    "counts": {s: sum(c.split == s for c in cases) for s in SPLIT_FOLDERS}}
        atomic_write_json(staging / "lvit_source.json", {"settings": settings, "cases": source})
        if splits is not None:
            atomic_write_json(staging / "splits_final.json", splits, sort_keys=False)
        atomic_write_json(staging / "dataset.json", {
            "channel_names": channel_names,  # not scheme names: nnU-Net's default z-score normalisation
            "labels": {"background": 0, label_name: 1},
            "numTraining": len(training),
            "file_ending": FILE_ENDING,
            "overwrite_image_reader_writer": "NaturalImage2DIO",
            "name": dataset_name,
            "description": (f"LViT-format dataset converted from {src.name} (Train/Val/Test_Folder with img/, "
                            "labelcol/, *_text.xlsx); the note <CASE>.txt beside the images in imagesTr|imagesTs "
                            "is the Description of the image's row. "
                            + ("Val_Folder cases are fold 0's validation cases (splits_final.json)."
                               if val_split == "fold" else "Val_Folder cases merged into training.")
                            + (f" Resized to {size}x{size}." if size else " Original image sizes.")),
            "licence": "see the source dataset's licence",
            "converted_by": "nnunet_textguided.data.lvit (nnunet-textguided convert-lvit)",
        }, sort_keys=False)
    if split_action == "replace":
        atomic_write_json(pre_split, splits, sort_keys=False)
        log(f"replaced the stale {pre_split} with LViT's split")
    elif split_action == "remove":
        pre_split.unlink()
        log(f"removed the stale {pre_split} (nnU-Net makes its 5-fold split at training start)")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nnunet-textguided convert-lvit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert an LViT-format dataset (QaTa-COV19, MosMedData+, MoNuSeg: Train/Val/Test_Folder with\n"
                    "img/, labelcol/ and a *_text.xlsx of 'Image' (mask name) and 'Description') to an nnU-Net v2\n"
                    "raw 2D PNG dataset with the note <CASE>.txt beside each case's image. Every image needs a mask\n"
                    "and a row with its note; all problems are listed at once and then nothing is written.",
        epilog="split (--val-split):\n"
               "  fold   (default) Val_Folder cases go to imagesTr and splits_final.json (raw dataset folder) makes\n"
               "         LViT's train/val split nnU-Net's fold 0; nnUNetv2_plan_and_preprocess copies it to\n"
               "         nnUNet_preprocessed/<Dataset>/, where the trainer reads it: nnUNetv2_train ID 2d 0\n"
               "  merge  Val_Folder cases join training; nnU-Net makes its own 5-fold cross-validation\n"
               "  A disagreeing nnUNet_preprocessed/<Dataset>/splits_final.json is an error (replaced/removed\n"
               "  with --overwrite).\n"
               "images: grayscale -> 1 channel 'gray'; colour (MoNuSeg) -> one RGB PNG <CASE>_0000.png read by\n"
               "  nnU-Net's NaturalImage2DIO as 3 channels R, G, B. Masks: > 0 -> 1.\n"
               "size: original by default (nnU-Net plans from the data, predictions keep the masks' geometry);\n"
               "  --size 224 reproduces LViT's 224x224 resizing (images bilinear, masks nearest).\n"
               "case ids: sanitised image stems; lvit_source.json maps them back.\n\n"
               "example:\n  nnunet-textguided convert-lvit datasets/QaTa-COV19 -d 501 --name QaTaCOV19\n"
               "  nnUNetv2_plan_and_preprocess -d 501 -c 2d --verify_dataset_integrity")
    p.add_argument("src", metavar="SRC", help="LViT task folder (holding Train_Folder/, Val_Folder/, Test_Folder/)")
    p.add_argument("-d", type=int, required=True, metavar="ID", help="dataset id (1..999)")
    p.add_argument("--name", required=True, help="dataset name (DatasetXXX_NAME)")
    p.add_argument("--val-split", choices=VAL_SPLITS, default="fold",
                   help="fold: Val_Folder = nnU-Net fold 0 validation (default); merge: into training, 5-fold CV")
    p.add_argument("--size", type=int, default=None, metavar="N",
                   help="resize to N x N (LViT: 224); default: keep the original size")
    p.add_argument("--channels", choices=CHANNEL_MODES, default="auto",
                   help="auto (default): RGB if any image is colour, else one gray channel")
    p.add_argument("--label-name", default="lesion", help="name of label 1 in dataset.json (default: lesion)")
    p.add_argument("--raw-root", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset (and a disagreeing preprocessed splits_final.json)")
    a = p.parse_args(argv)
    try:
        folder = convert_lvit(a.src, a.d, a.name, raw_root=a.raw_root, val_split=a.val_split, size=a.size,
                              channels=a.channels, label_name=a.label_name, overwrite=a.overwrite)
    except (ValueError, OSError) as e:  # OSError: FileExistsError, FileNotFoundError, unreadable images
        print(f"nnunet-textguided convert-lvit: error: {e}", file=sys.stderr)
        return 2
    info = json.loads((folder / "lvit_source.json").read_text(encoding="utf-8"))["settings"]
    counts = info["counts"]
    print(f"{folder}: {counts['train']} train + {counts['val']} val "
          f"({'fold 0 of splits_final.json' if a.val_split == 'fold' else 'merged into training'}), "
          f"{counts['test']} test cases; {info['channels']}; "
          f"{'%dx%d' % (a.size, a.size) if a.size else 'original size'}")
    print(f"next: nnUNetv2_plan_and_preprocess -d {a.d} -c 2d --verify_dataset_integrity")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
