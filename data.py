"""
Data for every training stage.

- Shapes: a synthetic captioned dataset, generated procedurally and deterministically from an index (no
  files, no downloads): one shape (circle, square, triangle) of a colour on a background colour, near the
  centre at a random size, captioned "a red circle on a blue background". Some (shape, colour,
  background) combinations are held out of training (split="heldout") so that generalisation to unseen
  combinations of seen attributes can be measured.
- check_attributes: reads shape, colour and background back from pixels, analytically (no learned
  weights): the tiny run's quality metric.
- ImageFolder: real data, as diffusers' train_text_to_image.py lays it out (metadata.jsonl with
  file_name/text) or as image + same-name .txt caption sidecars; resized and centre-cropped.

Images are float tensors (3, H, W) in [-1, 1]; a dataset item is (image, caption).
"""

import array
import io
import itertools
import json
import os
import random
import re
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# ----------------------------------------------------------------------------------------------------
# Synthetic captioned shapes
# ----------------------------------------------------------------------------------------------------

COLORS = {                        # RGB; far apart so that the checker's nearest-colour reading is unambiguous
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
STYLES = ("plain", "outlined")    # "outlined": the style variant for the §5.4 style-LoRA experiments
HOLE = 0.5                        # outlined: the shape with a hole of HOLE x its size cut out (a thick outline)
# The toy's geometry (the ablations: docs/results.md, "The toy geometry"):
RADIUS = (0.3, 0.4)               # shape radius range, in image sides: 10-13 px at 32 px, 5-7 cells of the 8x8
                                  # latent, like the objects the paper's 16x16 bottleneck sees many cells wide
JITTER = 0.03                     # the centre's offset from the image centre, at most (image sides; +-1 px at
                                  # 32 px). A caption then fixes its image up to size, and a model of minutes
                                  # draws it crisp; anywhere in the image, every position's average is a blob
SQUARE = 1.0                      # the square's half-side, in radii: it fills the circle's bounding box, so
                                  # the two differ by 4.5 px corners
# --data names of the synthetic shapes -> (radius range, largest centre offset). "shapes-varied": the same
# captions and combinations, with what a caption does not say free to vary: the size over twice the range and
# the centre anywhere that keeps clear of the border. A caption then no longer fixes its image, so E[x0 | x_t],
# what a one-step model trained on reconstruction alone converges to, is a blur over positions and sizes (4.2).
GEOMETRY = {"shapes": (RADIUS, JITTER), "shapes-varied": ((0.2, 0.4), 0.26)}


def is_shapes(name: str) -> bool:
    """Whether --data names a synthetic shapes dataset (GEOMETRY), whose attributes the checker reads."""
    return name in GEOMETRY


def all_combos():
    return [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]


def heldout_combos():
    """Every 10th combination in a fixed shuffled order: 9 of 90. Each held-out triple's attributes, and each
    of its pairs (shape+colour, colour+background, ...), still appear in training."""
    combos = all_combos()
    random.Random(0).shuffle(combos)
    return sorted(combos[::10])


def caption(shape: str, color: str, background: str, style: str = "plain") -> str:
    text = f"a {color} {shape} on a {background} background"
    return text if style == "plain" else f"{text} in {style} style"


def parse_caption(text: str) -> dict:
    """The attributes a caption asks for (inverse of `caption`)."""
    words = text.replace(",", " ").split()
    try:
        color, shape = words[1], words[2]
        background = words[words.index("on") + 2]
    except (IndexError, ValueError):
        raise ValueError(f"caption {text!r} is not of the form 'a <color> <shape> on a <color> background'")
    return {"shape": shape, "color": color, "background": background}


def shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """1 inside the shape, 0 outside; dx, dy: coordinates relative to its centre in units of its radius."""
    if shape == "circle":
        mask = dx.square() + dy.square() <= 1.0
    elif shape == "square":
        mask = torch.maximum(dx.abs(), dy.abs()) <= SQUARE
    elif shape == "triangle":                                        # apex up: y from -1 (apex) to 0.5 (base)
        mask = (dy <= 0.5) & (dx.abs() <= 0.866 * (dy + 1.0) / 1.5)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask.float()


def render(shape, color, background, cx, cy, r, resolution, style="plain", supersample=4) -> torch.Tensor:
    """One image (3, R, R) in [-1, 1]; centre (cx, cy) and radius r in units of the image side.
    Rendered at `supersample` x resolution and box-filtered, so edges are anti-aliased like a photo's."""
    n = resolution * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    mask = shape_mask(shape, (x - cx) / r, (y - cy) / r)
    if style == "outlined":                                          # a thick outline: the same shape, scaled
        # by HOLE about its centre, cut out. Coarse on purpose: the ring is 6-10 px wide at 64 px, about a
        # latent cell of the 8x VAE, which codes it without having seen one (thin stripes came back as a blur).
        mask = mask * (1 - shape_mask(shape, (x - cx) / (HOLE * r), (y - cy) / (HOLE * r)))
    fg = torch.tensor(COLORS[color], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    bg = torch.tensor(COLORS[background], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    img = bg + (fg - bg) * mask                                      # (3, n, n)
    return F.avg_pool2d(img[None], supersample)[0]                   # (3, R, R)


class Shapes(torch.utils.data.Dataset):
    """Deterministic synthetic (image, caption) pairs: item i is always the same picture.
    split: "train" (the 81 training combinations), "heldout" (the 9 held-out ones), or "all".
    style: "plain", "outlined", or "mixed" (half of each; captions say which). geometry: a GEOMETRY name."""

    def __init__(self, split: str = "train", resolution: int = 64, size: int = 100_000, seed: int = 0,
                 style: str = "plain", geometry: str = "shapes"):
        held = set(heldout_combos())
        if split == "train":
            self.combos = [c for c in all_combos() if c not in held]
        elif split == "heldout":
            self.combos = sorted(held)
        elif split == "all":
            self.combos = all_combos()
        else:
            raise ValueError(f"Shapes split = {split!r}, expected 'train', 'heldout' or 'all'")
        if style not in STYLES + ("mixed",):
            raise ValueError(f"Shapes style = {style!r}, expected one of {STYLES + ('mixed',)}")
        if geometry not in GEOMETRY:
            raise ValueError(f"Shapes geometry = {geometry!r}, expected one of {sorted(GEOMETRY)}")
        self.resolution, self.size, self.seed, self.style = resolution, size, seed, style
        self.radius, self.jitter = GEOMETRY[geometry]
        self.offset = {"train": 0, "heldout": 10**9, "all": 2 * 10**9}[split]   # disjoint random streams

    def __len__(self):
        return self.size

    def attributes(self, i: int) -> dict:
        rng = random.Random(self.seed * 10**10 + self.offset + i)
        shape, color, background = self.combos[rng.randrange(len(self.combos))]
        r = rng.uniform(*self.radius)                                # radius, in image sides
        off = min(self.jitter, 0.46 - r)                             # keep clear of the border (checker reads bg there)
        style = self.style if self.style != "mixed" else STYLES[rng.randrange(2)]
        return dict(shape=shape, color=color, background=background, style=style,
                    cx=0.5 + rng.uniform(-off, off), cy=0.5 + rng.uniform(-off, off), r=r)

    def __getitem__(self, i: int):
        a = self.attributes(i)
        img = render(a["shape"], a["color"], a["background"], a["cx"], a["cy"], a["r"], self.resolution, a["style"])
        return img, caption(a["shape"], a["color"], a["background"], a["style"])


# ----------------------------------------------------------------------------------------------------
# The attribute checker (analytic)
# ----------------------------------------------------------------------------------------------------

_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 127.5 - 1     # (6, 3)
_NAMES = list(COLORS)


def nearest_color(rgb: torch.Tensor) -> str:
    return _NAMES[int((_PALETTE - rgb.view(1, 3)).square().sum(1).argmin())]


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected region of a boolean mask (H, W): every pixel takes the highest label among its
    neighbours in the mask until nothing changes, then the most common label wins."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w) * mask
    for _ in range(h * w):
        grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    counts = torch.bincount(labels.long().flatten(), minlength=2)
    counts[0] = 0                                                   # 0: not in the mask
    return labels == counts.argmax()


def check_attributes(img: torch.Tensor) -> dict:
    """Read shape, colour, background (and whether it is outlined) back from an image (3, H, W) in [-1, 1].
    background: the median colour of a 2-pixel border (shapes keep clear of it).
    colour: the median of pixels far from the background colour (the shape), nearest palette colour.
    shape: the template (square, circle, apex-up triangle, each inscribed in the shape's bounding box) with the
           highest IoU with the filled shape. Robust to a soft edge, which is what a decoder draws: 32 px shapes
           blurred by a Gaussian of sigma 1 px read 98% (a threshold on the fraction of the box filled has no
           margin at 32 px, where a circle fills 0.71-0.86 of its box from pixel rounding alone).
    style: outlined if 5% or more of the filled shape (holes filled) is background: the outline's hole is
           HOLE^2 = 25% of it; decoded by the tiny VAE, 10-27%; a plain shape, decoded or not, has none."""
    img = img.float().clamp(-1, 1)
    h, w = img.shape[-2:]
    border = torch.cat([img[:, :2].flatten(1), img[:, -2:].flatten(1), img[:, :, :2].flatten(1),
                        img[:, :, -2:].flatten(1)], dim=1)                               # (3, n)
    bg_rgb = border.median(dim=1).values
    dist = (img - bg_rgb.view(3, 1, 1)).square().sum(0).sqrt()                          # (H, W)
    mask = dist > 0.5                                                                   # clearly not background
    if mask.sum() < 4:
        return {"shape": None, "color": None, "background": nearest_color(bg_rgb), "style": None}
    fg_rgb = img[:, mask].median(dim=1).values
    # Then the shape is what is closer to its colour than to the background's (a decoded outline's hole is
    # a blur of both colours; by distance alone it would count as shape).
    mask = (img - fg_rgb.view(3, 1, 1)).square().sum(0) < (img - bg_rgb.view(3, 1, 1)).square().sum(0)
    mask = largest_component(mask)        # stray specks a decoder leaves in the background are not the shape
    # Fill holes: background that cannot be reached from the image border is inside the shape. An outlined
    # shape fills back to the plain one, so shape reads the same in both styles.
    outside = torch.zeros_like(mask)
    outside[[0, -1], :], outside[:, [0, -1]] = True, True
    outside &= ~mask
    for _ in range(h + w):                                       # flood fill, one 3x3 dilation per pass
        grown = F.max_pool2d(outside.float()[None, None], 3, 1, 1)[0, 0].bool() & ~mask
        if torch.equal(grown, outside):
            break
        outside = grown
    closed = ~outside                                                                   # (H, W) the filled shape
    ys, xs = torch.nonzero(closed, as_tuple=True)
    y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    dx, dy = (xx - (x0 + x1) / 2) / ((x1 - x0) / 2), (yy - (y0 + y1) / 2) / ((y1 - y0) / 2)   # box: [-1, 1]^2
    templates = {"square": (dx.abs() <= 1) & (dy.abs() <= 1), "circle": dx.square() + dy.square() <= 1,
                 "triangle": (dy <= 1) & (dx.abs() <= (dy + 1) / 2)}                   # apex at the box's top
    iou = {k: (t & closed).sum().item() / (t | closed).sum().item() for k, t in templates.items()}
    shape = max(iou, key=iou.get)
    outlined = mask.sum().item() < 0.95 * closed.sum().item()
    return {"shape": shape, "color": nearest_color(fg_rgb), "background": nearest_color(bg_rgb),
            "style": "outlined" if outlined else "plain"}


def caption_style(text: str) -> str:
    """The style a caption asks for: "... in outlined style" -> "outlined"; no style phrase -> "plain"."""
    words = text.split()
    return words[-2] if len(words) > 2 and words[-1] == "style" and words[-3] == "in" else "plain"


def attribute_accuracy(images: torch.Tensor, captions: list[str]) -> dict:
    """Fraction of images whose checked shape / colour / background / style match their captions."""
    hits = {"shape": 0, "color": 0, "background": 0, "style": 0}
    for img, text in zip(images, captions):
        want, got = {**parse_caption(text), "style": caption_style(text)}, check_attributes(img)
        for k in hits:
            hits[k] += want[k] == got[k]
    return {k: v / max(len(captions), 1) for k, v in hits.items()}


# ----------------------------------------------------------------------------------------------------
# Real data: an image folder; the training order of any dataset
# ----------------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
HELDOUT_EVERY = 50                # real folders: every 50th item (by sorted order) is held out for the reports


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, as a viewer shows it: EXIF orientation applied; 16- and 32-bit greyscale scaled
    to 8 bits (PIL's convert("RGB") clips them, so a 16-bit PNG turns white); transparency (RGBA, LA, a palette's
    transparent index) composited on white, not black; CMYK and palettes converted by PIL."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):       # 16-bit PNGs load as I;16 or I (0 .. 65535)
        arr = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8), "L")
    elif im.mode == "F":                                           # float TIFF-likes: taken as 0 .. 1
        im = Image.fromarray(np.clip(np.asarray(im) * 255.0, 0, 255).round().astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def resize_crop(im: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bicubic), centre-crop (diffusers' train_text_to_image),
    -> (3, R, R) in [-1, 1]."""
    s = resolution / min(im.size)
    im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))), Image.BICUBIC)
    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1


def draft(im: Image.Image, resolution: int) -> Image.Image:
    """A JPEG of twice the size or more is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft: the DCT does the first
    halvings), never below `resolution` on either side: it halves decoding time (docs/results.md). Call it on a
    file just opened, before its pixels are read."""
    if im.format == "JPEG":
        im.draft(im.mode, (resolution, resolution))
    return im


def load_image(path, resolution: int, min_size: int = 0) -> torch.Tensor:
    """An image file (a path, or a file object: a shard member's bytes) as (3, R, R) in [-1, 1] (to_rgb,
    resize_crop). An image whose shorter side is below min_size raises TooSmall (counted apart from unreadable
    files)."""
    with Image.open(path) as im:
        if min(im.size) < min_size:
            where = f"{path}: " if isinstance(path, str) else ""
            raise TooSmall(f"{where}{im.width}x{im.height}, shorter side below --min_size {min_size}")
        return resize_crop(to_rgb(draft(im, resolution)), resolution)


class TooSmall(ValueError):
    """An image below the minimum size: dropped from training, and counted."""


def read_caption(path: str) -> str:
    """A caption sidecar (.txt), UTF-8 (a BOM is dropped); a file that is not UTF-8 is an error naming it."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8")


def metadata_items(meta: str, root: str):
    """(path, caption) per line of a diffusers metadata.jsonl: {"file_name": <path relative to the folder>,
    "text": <caption or null>}. A line that is not such an object, or a file_name outside the folder (absolute,
    or climbing out with ..), is an error naming the file and line."""
    with open(meta, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{meta}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
                raise ValueError(f'{where}: expected an object with a string "file_name" (and "text"), got '
                                 f"{line.strip()[:80]!r}")
            text = rec.get("text", "")
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise ValueError(f'{where}: "text" is {type(text).__name__} {text!r}, expected a string or null')
            name = rec["file_name"]
            rel = os.path.normpath(name)
            if os.path.isabs(name) or rel == os.pardir or rel.startswith(os.pardir + os.sep):
                raise ValueError(f'{where}: "file_name" {name!r} is outside the folder {root} (expected a path '
                                 f"relative to it)")
            yield os.path.join(root, rel), text


def sidecar_items(root: str):
    """(path, caption) for every image under `root`, in sorted order, with a same-name .txt caption (a missing
    one is an empty caption). Subfolders included: img2dataset's folder output is 00000/<key>.jpg + <key>.txt."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTS:
                txt = os.path.join(folder, stem + ".txt")
                yield os.path.join(folder, name), read_caption(txt) if os.path.isfile(txt) else ""


def existing(pairs, missing: list):
    """The (path, caption) pairs whose file exists; the others' paths go to `missing`."""
    for path, text in pairs:
        if os.path.isfile(path):
            yield path, text
        else:
            missing.append(path)


def is_heldout(k: int, n: int) -> bool:
    """Item k of a folder of n is held out: every HELDOUT_EVERY-th; in a smaller folder, the last of two or more."""
    return k % HELDOUT_EVERY == HELDOUT_EVERY - 1 if n >= HELDOUT_EVERY else n > 1 and k == n - 1


class ItemTable:
    """(path, caption) pairs packed into one byte string with offsets: about the text's own size, where a list
    of a million tuples costs ~330 MB per process, and nothing that DataLoader workers' reference counts copy
    page by page (the fork-and-copy growth of big Python lists)."""

    def __init__(self, pairs):
        self.blob, self.offsets = bytearray(), array.array("q", [0])
        for path, text in pairs:
            for s in (path, text):
                self.blob += s.encode("utf-8")
                self.offsets.append(len(self.blob))
        self.blob = bytes(self.blob)

    def __len__(self):
        return (len(self.offsets) - 1) // 2

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> tuple[str, str]:
        o = self.offsets
        return (self.blob[o[2 * i]:o[2 * i + 1]].decode("utf-8"), self.blob[o[2 * i + 1]:o[2 * i + 2]].decode("utf-8"))


class ImageFolder(torch.utils.data.Dataset):
    """Captioned images from a folder: `metadata.jsonl` lines {"file_name": ..., "text": ...} (diffusers'
    layout), else every image under it with a same-name .txt sidecar (img2dataset's folder output included; a
    missing sidecar means an empty caption, which classifier-free guidance training uses anyway).
    split: "all", "train" or "heldout" (every HELDOUT_EVERY-th item; with fewer items, the last one).
    An image that cannot be read, or is below min_size, is skipped (the next one is used) and counted in
    `self.skipped` / `self.too_small`, so a long run never dies on one bad file."""

    def __init__(self, root: str, resolution: int, split: str = "all", min_size: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist")
        if split not in ("all", "train", "heldout"):
            raise ValueError(f"ImageFolder split = {split!r}, expected 'all', 'train' or 'heldout'")
        self.root, self.resolution, self.min_size, self.skipped, self.too_small = root, resolution, min_size, 0, 0
        meta = os.path.join(root, "metadata.jsonl")
        listed = metadata_items(meta, root) if os.path.isfile(meta) else sidecar_items(root)
        missing = []
        found = ItemTable(existing(listed, missing))
        if missing:
            print(f"data: {len(missing)} files listed in {meta} are missing (first: {missing[0]}); skipped")
        n = len(found)
        if not n:
            raise ValueError(f"data folder {root!r} has no usable images (looked for metadata.jsonl, "
                             f"or {'/'.join(IMAGE_EXTS)} files with .txt captions, subfolders included)")
        if split == "all":
            self.items = found
        else:
            self.items = ItemTable(found[k] for k in range(n) if is_heldout(k, n) == (split == "heldout"))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int):
        for k in range(len(self.items)):
            path, text = self.items[(i + k) % len(self.items)]
            try:
                return load_image(path, self.resolution, self.min_size), text
            except TooSmall:
                self.too_small += 1
            except Exception as e:                               # corrupt / truncated / not an image
                self.skipped += 1
                print(f"data: skipping unreadable image {path} ({type(e).__name__}: {e}); {self.skipped} skipped so far")
        raise ValueError(f"data folder {self.root!r}: none of its {len(self.items)} images could be read "
                         f"({self.too_small} below --min_size {self.min_size})")


class Latents(torch.utils.data.Dataset):
    """A fixed training set kept as VAE latents in memory: item i is (latent (c, h, w), caption)
    (train_utils.encode_dataset)."""
    yields_latents = True

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.latents[i], self.captions[i]


# ----------------------------------------------------------------------------------------------------
# Data at scale: WebDataset tar shards as img2dataset writes them, and latent shards (train.py --stage encode)
# ----------------------------------------------------------------------------------------------------
#
# img2dataset's "webdataset" output: 00000.tar, 00001.tar, ..., each a stream of samples whose members share a
# key: <key>.jpg (or .png / .webp), <key>.txt (the caption), <key>.json (its metadata). The tar module reads them
# as a stream (never whole), so a shard of any size costs the memory of one sample.

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LATENTS_MANIFEST = "latents.json"


def expand_braces(pattern: str) -> list[str]:
    """'s/{00000..00002}.tar' -> ['s/00000.tar', 's/00001.tar', 's/00002.tar'] (zero padding kept), and
    '{a,b}' -> both; several groups expand left to right, as the shell and webdataset do."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        if int(hi) < int(lo):
            raise ValueError(f"--data {pattern!r}: the range {{{body}}} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def shard_paths(spec: str) -> list[str] | None:
    """The shards --data names, or None if it names none: a brace pattern or a path ending in .tar, a folder
    holding .tar files (or the encode stage's latent shards, listed in its latents.json), or a .txt file
    listing shards (one per line, relative to the list's folder). Every listed shard must exist."""
    if os.path.isdir(spec):
        man = latents_manifest(spec)
        if man is not None:
            return [os.path.join(spec, n) for n in man["shards"]]
        return [os.path.join(spec, n) for n in sorted(os.listdir(spec)) if n.endswith(".tar")] or None
    if spec.endswith(".txt") and os.path.isfile(spec):
        base = os.path.dirname(spec)
        with open(spec, encoding="utf-8") as f:
            paths = [os.path.join(base, ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")]
    elif spec.endswith(".tar") or "{" in spec:
        paths = expand_braces(spec)
    else:
        return None
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise FileNotFoundError(f"--data {spec!r}: {len(missing)} of {len(paths)} shards do not exist "
                                f"(first: {missing[0] if missing else 'none listed'})")
    return paths


def read_manifest(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable latents manifest ({e})") from None
    missing = [k for k in ("shards", "resolution", "vae") if k not in man]
    if missing:
        raise ValueError(f"{path}: the latents manifest lacks {', '.join(missing)} (written by train.py --stage encode)")
    return man


def tar_samples(path: str, counts: dict):
    """(key, {extension: bytes}) for each sample of a tar shard, read as a stream. A shard that breaks off
    (truncated, not a tar) ends there, counted in counts["bad_shards"]."""
    key, parts = None, {}
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                folder, name = os.path.split(m.name)
                stem, _, ext = name.partition(".")            # webdataset: the key ends at the first dot
                k = os.path.join(folder, stem)
                payload = tf.extractfile(m).read()
                if k != key and parts:
                    yield key, parts
                    parts = {}
                key = k
                parts[ext.lower()] = payload
            end = tf.offset
        with open(path, "rb") as f:                          # tarfile ends silently at a cut-off header: a
            f.seek(end)                                      # whole archive ends in zero blocks instead
            if f.read(512) != bytes(512):
                raise tarfile.ReadError(f"cut off after byte {end} (no end-of-archive block)")
    except (tarfile.TarError, OSError, EOFError) as e:
        counts["bad_shards"] = counts.get("bad_shards", 0) + 1
        print(f"data: shard {path} is unreadable from some point on ({type(e).__name__}: {e}); going on with the next")
    if parts:
        yield key, parts


def decode_sample(parts: dict, resolution: int, min_size: int = 0):
    """One img2dataset sample as (image (3, R, R) in [-1, 1], caption): the first image member, the .txt
    caption (else the .json's "caption"). Raises on anything it cannot read (ShardStream counts it)."""
    ext = next((e for e in SHARD_IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise ValueError(f"no image member (expected one of {', '.join(SHARD_IMAGE_EXTS)}; got {sorted(parts)})")
    image = load_image(io.BytesIO(parts[ext]), resolution, min_size)
    if "txt" in parts:
        text = parts["txt"].decode("utf-8").strip()
    else:
        text = str(json.loads(parts["json"]).get("caption") or "") if "json" in parts else ""
    return image, text


def latent_samples(path: str):
    """(index, (mean, std, caption)) for each latent of a shard written by train.py --stage encode."""
    shard = torch.load(path, map_location="cpu", weights_only=True)
    for i, text in enumerate(shard["captions"]):
        yield i, (shard["mean"][i], shard["std"][i], text)


class ShardStream(torch.utils.data.IterableDataset):
    """(image or latent, caption) items streamed from shards, for one process of one run.

    The order is a function of (seed, epoch) alone: each epoch shuffles the shard list, each reader (one
    DataLoader worker of one DDP rank) takes every readers-th shard of it (every readers-th sample instead, when
    there are fewer shards than readers), and a shuffle buffer of `shuffle_buffer` samples mixes within and
    across its shards. The DataLoader takes micro-batch j from worker j % workers, so a resumed run knows how
    many samples each reader had handed out, and skips them undecoded (configure). A sample that cannot be
    decoded (or is below min_size) is counted and its slot filled by the reader's previous good sample, so a bad
    file never shifts the order. kind "images": tar shards; "latents": the encode stage's shards, whose
    posterior mean is the latent (as train_utils.to_latents encodes one on the fly)."""

    def __init__(self, shards: list[str], resolution: int, kind: str = "images", shuffle_buffer: int = 1000,
                 min_size: int = 0):
        self.shards, self.resolution, self.kind = shards, resolution, kind
        self.shuffle_buffer, self.min_size = max(1, shuffle_buffer), min_size
        self.yields_latents = kind == "latents"
        self.seed, self.rank, self.world, self.skip_batches, self.micro = 0, 0, 1, 0, 1

    def configure(self, seed: int, rank: int, world: int, start_step: int, micro: int, grad_accum: int):
        """Called once per stage (data.batches) before the DataLoader starts its workers."""
        self.seed, self.rank, self.world, self.micro = seed, rank, world, micro
        self.skip_batches = start_step * grad_accum                 # micro-batches this rank has already had

    def raw(self, epoch: int, reader: int, readers: int, counts: dict):
        order = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        by_shard = len(order) >= readers
        k = 0
        for path in (order[reader::readers] if by_shard else order):
            for _, parts in (tar_samples(path, counts) if self.kind == "images" else latent_samples(path)):
                if by_shard or k % readers == reader:
                    yield parts
                k += 1

    def decode(self, parts):
        if self.kind == "latents":
            mean, _std, text = parts
            return mean.float(), text
        return decode_sample(parts, self.resolution, self.min_size)

    def shuffled(self, samples, rng: random.Random):
        """The shuffle buffer: each sample once, a random one of the buffer's out each time it is full, the rest
        in a random order at the end."""
        buffer = []
        for parts in samples:
            buffer.append(parts)
            if len(buffer) < self.shuffle_buffer:
                continue
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        reader, readers = self.rank * workers + worker, self.world * workers
        # this reader's share of the micro-batches already consumed: j < skip_batches with j % workers == worker
        skip = max(0, (self.skip_batches - worker + workers - 1) // workers) * self.micro
        counts, last, epoch = {"bad": 0, "small": 0}, None, 0
        while True:
            produced = 0
            rng = random.Random(f"{self.seed}-{epoch}-{reader}")
            for parts in self.shuffled(self.raw(epoch, reader, readers, counts), rng):
                produced += 1
                if skip:                                         # handed out before the resume: not decoded
                    skip -= 1
                    continue
                last = self.item(parts, last, counts)
                if last is not None:
                    yield last
            if produced == 0:
                raise ValueError(f"data: reader {reader} of {readers} got no samples from {len(self.shards)} "
                                 f"shards (empty shards, or fewer samples than readers)")
            epoch += 1

    def item(self, parts, last, counts):
        """The decoded sample, or (when it cannot be read) the previous good one, counted."""
        try:
            return self.decode(parts)
        except Exception as e:
            counts["small" if isinstance(e, TooSmall) else "bad"] += 1
            n = counts["bad"] + counts["small"]
            if n & (n - 1) == 0:                                     # 1, 2, 4, 8, ...: a count, not a flood
                print(f"data: {counts['bad']} unreadable and {counts['small']} too-small samples so far "
                      f"(latest: {type(e).__name__}: {e}); each slot filled by the previous good sample")
            return last


class Heldout(torch.utils.data.Dataset):
    """The first `n` samples of a held-out shard, decoded on access (map-style, for the reports)."""

    def __init__(self, shard: str, resolution: int, n: int = 256):
        self.resolution, counts, self.samples = resolution, {}, []
        for _, parts in tar_samples(shard, counts):
            self.samples.append(parts)
            if len(self.samples) == n:
                break

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int):
        return decode_sample(self.samples[i], self.resolution)


class HeldoutImages(torch.utils.data.Dataset):
    """Held-out images kept as uint8 with their captions (the encode stage's heldout.pt)."""

    def __init__(self, path: str):
        d = torch.load(path, map_location="cpu", weights_only=True)
        self.images, self.captions = d["images"], d["captions"]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.images[i].float() / 127.5 - 1, self.captions[i]


def make_dataset(data: str, split: str, resolution: int, style: str = "plain", min_size: int = 0,
                 shuffle_buffer: int = 1000):
    """--data as a dataset of (image or latent, caption): "shapes" / "shapes-varied" (synthetic); latent shards (a
    folder with latents.json, made by --stage encode); tar shards (a brace pattern, a .tar, a folder of .tar files, or a
    .txt list), the last one held out when there are two or more; else an image folder."""
    if is_shapes(data):
        return Shapes(split, resolution, style=style, geometry=data)
    shards = shard_paths(data)
    if shards is None:
        return ImageFolder(data, resolution, split, min_size)
    man = latents_manifest(data)
    if man is not None:
        if man["resolution"] != resolution:
            raise ValueError(f"--data {data}: latents of {man['resolution']}px images, but --resolution {resolution}")
        if split == "heldout":
            return HeldoutImages(os.path.join(data, "heldout.pt"))
        return ShardStream(shards, resolution, "latents", shuffle_buffer)
    train, held = (shards[:-1], shards[-1]) if len(shards) > 1 else (shards, shards[0])
    if split == "heldout":
        return Heldout(held, resolution)
    return ShardStream(train, resolution, "images", shuffle_buffer, min_size)


def latents_manifest(data: str) -> dict | None:
    """The encode stage's record (which VAE, resolution, count) when --data is a latent folder, else None."""
    path = os.path.join(data, LATENTS_MANIFEST)
    return read_manifest(path) if os.path.isdir(data) and os.path.isfile(path) else None


class StepBatches(torch.utils.data.Sampler):
    """This process's micro-batches of indices for optimizer steps start_step, start_step + 1, ... (forever).
    The global order is a fixed function of (seed, step): a permutation of the dataset per epoch, step s taking
    the s-th slice of batch_size; process r takes its contiguous part. So a resumed run, a run on 2 processes
    and a run on 1 process with the doubled batch all see the same images at the same step."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int, rank: int, world: int, start_step: int):
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self.rank, self.per_proc, self.start = rank, batch_size // world, start_step

    def __iter__(self):
        micro, perm, perm_epoch, step = self.per_proc // self.grad_accum, None, -1, self.start
        while True:
            first = step * self.batch_size + self.rank * self.per_proc
            idx = []
            for g in range(first, first + self.per_proc):
                epoch, k = divmod(g, self.n)
                if epoch != perm_epoch:
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                    perm_epoch = epoch
                idx.append(int(perm[k]))
            for k in range(self.grad_accum):
                yield idx[k * micro:(k + 1) * micro]
            step += 1


def chunked(readers, size: int, counts: dict):
    """(images (B, 3, H, W), captions) batches of `size` from an iterator of readers, each a function that
    returns one (image, caption); a reader that raises is counted (counts["bad"], or counts["small"] for an
    image below the minimum size) and left out (the encode stage's reading of shards)."""
    batch = []
    for read in readers:
        try:
            batch.append(read())
        except Exception as e:
            kind = "small" if isinstance(e, TooSmall) else "bad"
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "bad":
                print(f"data: skipping an unreadable sample ({type(e).__name__}: {e}); {counts['bad']} so far")
            continue
        if len(batch) == size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


def first_items(dataset, n: int) -> list:
    """The first n items of a map-style dataset, or the first n a stream yields."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return list(itertools.islice(iter(dataset), n))
    return [dataset[i] for i in range(min(n, len(dataset)))]


def collate(items):
    return torch.stack([x for x, _ in items]), [t for _, t in items]


def batches(dataset, batch_size: int, grad_accum: int, seed: int, rank: int, world: int, start_step: int, device: str,
            num_workers: int = 0, flip: bool = False):
    """Yields this process's micro-batches, (images or latents, captions), for optimizer steps start_step, ...
    (batch_size: the global batch per optimizer step, over `world` processes and `grad_accum` micro-steps),
    from one persistent DataLoader: with workers, decoding overlaps the training step (4 batches prefetched per
    worker). A map-style dataset is read in StepBatches' order; a ShardStream in its own (seed, epoch) order.
    flip: each image of the global batch flipped left-right with probability 1/2, drawn from (seed, step)."""
    micro = batch_size // world // grad_accum
    # The loader's own generator: creating its iterator draws a seed for the workers, and from the global RNG
    # that draw would shift every random number the stage draws after it (the VAE's posterior samples) by
    # where the stage started, so that a resumed run would not repeat the straight one.
    opts = dict(num_workers=num_workers, collate_fn=collate, pin_memory=device.startswith("cuda"),
                persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                generator=torch.Generator().manual_seed(seed))
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.configure(seed, rank, world, start_step, micro, grad_accum)
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro, **opts)
    else:
        sampler = StepBatches(len(dataset), batch_size, grad_accum, seed, rank, world, start_step)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **opts)
    per_proc, step, k = batch_size // world, start_step, 0
    for x, texts in loader:
        if flip:                        # half of the global batch, left-right, from (seed, step) alone
            coin = torch.rand(batch_size, generator=torch.Generator().manual_seed(seed * 7_919 + step + 1)) < 0.5
            mine = coin[rank * per_proc + k * micro:rank * per_proc + (k + 1) * micro]
            x = torch.where(mine.view(-1, 1, 1, 1), x.flip(-1), x)
        yield x.to(device, non_blocking=True), texts
        k += 1
        if k == grad_accum:
            step, k = step + 1, 0


# ----------------------------------------------------------------------------------------------------
# Pictures out
# ----------------------------------------------------------------------------------------------------

def to_pil(img: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


# Pixels per call of a network on whole images outside the training step (the VAE encoder for cached latents
# and validation, reconstruction and sampling for the reports): the md VAE's outer feature maps are
# 128 x H x W, so 64 images of 512px in one call would need ~9 GB per tensor.
CALL_PIXELS = 2 ** 20


def images_per_call(resolution: int, most: int) -> int:
    """`most` images per call up to 64px (the tiny run's batches), fewer above: 16 at 256px, 4 at 512px."""
    return max(1, min(most, CALL_PIXELS // resolution ** 2))


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> Image.Image:
    """(N, 3, H, W) in [-1, 1] -> one PIL image, `nrow` images per row, white gutters."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(to_pil(img), (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    return grid


# ----------------------------------------------------------------------------------------------------
# A quality number that needs no download: Frechet distance on pixel features
# ----------------------------------------------------------------------------------------------------

def pixel_features(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3*size*size): area-averaged thumbnails. Colour, position and coarse shape
    survive at 8x8, which is what the synthetic data varies; no pretrained network is involved."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


@torch.no_grad()
def sharpness(images: torch.Tensor) -> float:
    """Edge sharpness of (N, 3, H, W) images: the mean squared difference between neighbouring pixels (both axes,
    all channels) after 2x2 area averaging. An edge of height h spread over w pixels contributes ~h^2 / w, so a
    blur (the E[x0 | x_t] of 4.2) lowers it; the averaging removes most of the pixel-level texture a decoder adds,
    which would otherwise count as edges (a mean absolute difference does not see blur at all: an edge's total
    variation is the same however wide). evaluate_t2i reports generated over real (1: as sharp as the data).
    Measured on the tiny run's images (docs/results.md): VAE reconstructions 0.97, Gaussian blur sigma 1 px 0.63."""
    x = F.avg_pool2d(images.float(), 2)
    return float(((x[..., 1:, :] - x[..., :-1, :]).square().mean() + (x[..., 1:] - x[..., :-1]).square().mean()) / 2)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets
    (Heusel et al. 2017, the FID formula). Tr((S_a S_b)^(1/2)) is computed exactly as the sum of square roots
    of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric PSD (no complex sqrtm needed)."""
    if min(len(a), len(b)) < 2:
        raise ValueError(f"Frechet distance needs at least 2 images on each side (a covariance), got {len(a)} "
                         f"generated and {len(b)} reference")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)
