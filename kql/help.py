"""The text of ``HELP [<topic>]``: an overview, and per topic its syntax and one example.

>>> print(help_text("patch").splitlines()[0])
PATCH <n>[x<m>]
>>> help_text("nope")
Traceback (most recent call last):
    ...
kql.errors.KqlError: unknown HELP topic 'nope'; topics: APPROX, BATCH, CALIBRATIONS, COLOR, DESCRIBE, DRILLDOWN, EXACT, EXPLAIN, GATES, HELP, INTO, LABEL, LOAD, NAIVE, NORMALIZE, ON, PATCH, REGION, RESAMPLE, SELECT, SET, SHOW, SSIM, STRIDE, TAU, TUNE, VOLUMES, WEIGHTS, WINDOW
"""
from __future__ import annotations

from typing import Optional

from kql.errors import KqlError

__all__ = ["help_text", "TOPICS"]

_OVERVIEW = """\
KQL explains a CNN's prediction by occlusion: it slides a patch over the image,
re-runs the model for each position and records the class probability as a heatmap.

Statements (end each with ';'; keywords are case-insensitive, '--' starts a comment):
  SELECT HEATMAP FROM <image> USING <model> PATCH <n> STRIDE <n> [clauses]
                                       compute an occlusion heatmap
  EXPLAIN [ANALYZE] SELECT ...         show the plan (ANALYZE also runs it and times it)
  DESCRIBE <model> [INPUT <h>x<w>] [PATCH <n> STRIDE <n>]
                                       show a model's layers, shapes and costs
  SHOW MODELS | IMAGES | SETTINGS | CALIBRATIONS
                                       list what the session knows
  TUNE <model> ON <images> PATCH <n>   calibrate APPROX SSIM on sample images
  LOAD IMAGE '<file>' AS <name>        bind an image file to a name
  LOAD MODEL '<file>' AS <name> [ARCHITECTURE <arch>] [TRUSTED]
                                       bind a model file to a name
  SET <option> = <value>               change a session setting
  HELP [<topic>]                       this text, or help on one topic

SELECT clauses: WEIGHTS, PATCH, STRIDE, COLOR, LABEL, REGION, NAIVE/EXACT, BATCH, ON, INTO;
on volumes also WINDOW, NORMALIZE, RESAMPLE (HELP VOLUMES).
Topics: {topics}.
Example:
  SELECT HEATMAP FROM coffee USING efficientnet_lite0 PATCH 16 STRIDE 8 INTO 'coffee.png';"""

_SELECT = """\
SELECT HEATMAP FROM <image> USING <model> [WEIGHTS '<file>']
    PATCH <n>[x<m>] STRIDE <n>[x<m>]
    [COLOR BLACK | GRAY | GREY | MEAN | <number> | (<r>, <g>, <b>)]
    [LABEL <index> | '<class name>' | PREDICTED | <label>, ... | TOP <k> | ALL]
    [REGION (<x0>, <y0>, <x1>, <y1>)]
    [NAIVE | EXACT | APPROX TAU <t> | APPROX SSIM <s>]
    [DRILLDOWN [FRACTION <r>] [SPEEDUP <t>]] [GATES EXACT | LOCAL | FROZEN]
    [BATCH <n>] [ON CPU | CUDA] [INTO '<file>']

Occludes the image with a patch at every stride step, runs the model on each
occluded image and returns the heatmap of the chosen class probability.
<image> is a quoted file path or a name (LOAD IMAGE, a Python binding, or a
bundled sample such as coffee). A quoted folder or glob ('scans/', 'scans/*.png')
explains every image in it, INTO a folder (HELP INTO). <model> is a torchvision architecture name or
a name bound by LOAD MODEL. PATCH and STRIDE are required; the clauses after
USING <model> may come in any order, each at most once.
Sizes are height x width: PATCH 16x8 is 16 rows by 8 columns; PATCH 16 is 16x16.
Example:
  SELECT HEATMAP FROM 'cat.jpg' USING resnet18 PATCH 16 STRIDE 4 COLOR BLACK LABEL 'tabby';"""

_EXPLAIN = """\
EXPLAIN [ANALYZE] SELECT HEATMAP ...

Shows the plan the optimizer chose for a SELECT: the layers, how much of each
is recomputed per patch position, the estimated cost and the rewrites applied.
With ANALYZE the query also runs, and the plan shows measured times.
Example:
  EXPLAIN SELECT HEATMAP FROM coffee USING vgg16 PATCH 16 STRIDE 8;"""

_DESCRIBE = """\
DESCRIBE <model> [WEIGHTS '<file>'] [INPUT <h>x<w>] [PATCH <n>[x<m>] STRIDE <n>[x<m>]]

Shows a model's layers with their kinds and output shapes for the given input
size. With PATCH and STRIDE (always together) it also shows how far a patch
change spreads through each layer.
Example:
  DESCRIBE resnet18 INPUT 224x224 PATCH 16 STRIDE 4;"""

_SHOW = """\
SHOW MODELS | SHOW IMAGES | SHOW SETTINGS | SHOW CALIBRATIONS

Lists the models (built in and loaded), the images (bound and bundled), the
session settings with their current values, or the SSIM calibrations APPROX
SSIM can use (HELP CALIBRATIONS).
Example:
  SHOW SETTINGS;"""

_TUNE = """\
TUNE <model> ON <images> PATCH <n>[x<m>] [STRIDE <n>[x<m>]] [WEIGHTS '<file>']
    [COLOR ...] [TAUS (<t>, <t>, ...)]

Calibrates APPROX SSIM for a model, its weights, input size and patch: on
each sample image it compares the heatmap of APPROX TAU t with the exact one
(SSIM) for every t in TAUS (default 1.0, 0.9, ..., 0.4), fits SSIM against t
and stores the result (SHOW CALIBRATIONS). <images> is a quoted folder or
glob, or image names separated by commas. STRIDE defaults to half the patch.
APPROX SSIM s then uses the smallest tuned t at which 80% of the images
reached s. TUNE also replays adaptive refinement on each exact heatmap (no
extra inference) to calibrate its safety margin and expected work, on grids
of at least 17x17 positions (9x9x9 on volumes). On a model with
squeeze-and-excitation gates it also measures GATES LOCAL and FROZEN, alone
and with every t in TAUS. Ctrl-C stops it without storing anything. On volumes
(files .npy / .nii / .nii.gz, bound arrays, phantom; never mixed with images)
PATCH 8 is a cube and WINDOW, NORMALIZE and RESAMPLE mean what they mean in
SELECT.
Examples:
  TUNE efficientnet_lite0 ON coffee, chelsea, astronaut PATCH 16 STRIDE 8;
  TUNE my_net ON 'scans/*.png' PATCH 8 TAUS (0.9, 0.7, 0.5);
  TUNE my_3d_net ON 'ct/*.nii.gz' PATCH 8 STRIDE 2 WINDOW (-1000, 400);"""

_CALIBRATIONS = """\
SHOW CALIBRATIONS

Lists the calibrations TUNE made (the user store: $KQL_DATA_DIR, by default
~/.local/share/kql/calibrations.json) and those shipped with KQL, with the
model, weights, input, patch, stride, images, thresholds measured, fit, the
t chosen for SSIM 0.8 / 0.9 / 0.95, adaptive refinement's margin and median
share of positions computed for each target, gate freezing (SSIM reached and
work of GATES LOCAL / FROZEN alone, t with them for each target; - when not
measured or the model has no gates), and where each comes from.
Example:
  SHOW CALIBRATIONS;"""

_LOAD = """\
LOAD IMAGE '<file>' AS <name>
LOAD MODEL '<file>' AS <name> [ARCHITECTURE <arch>] [TRUSTED]

Binds a file to a name for later queries. With ARCHITECTURE the model file is
a state dict for that torchvision architecture and is loaded safely. Without
it the file is a whole pickled model, which runs code when loaded: it is
refused unless you add TRUSTED.
Examples:
  LOAD IMAGE 'photos/dog.png' AS dog;
  LOAD MODEL 'ckpt/resnet18_finetuned.pt' AS mine ARCHITECTURE resnet18;"""

_SET = """\
SET <option> = <value>

Changes a session setting. A value is a number, a quoted string, an
identifier, or TRUE / FALSE / ON / OFF (booleans; quote them for the word).
Option names are case-insensitive.
  device        cpu | cuda          where queries run (ON CPU / ON CUDA overrides it)
  batch_size    <int>               positions per model call; 0 (default) sizes
                                    batches from memory_limit (BATCH overrides it)
  memory_limit  2GB, '512MiB', ...  memory the occluded batch may take
  progress      auto | on | off     progress bar; auto shows it on a terminal
  gather_backend auto | torch | numba | cuda
                                    kernel gathering read-in windows in exact mode;
                                    auto picks one per layer (EXPLAIN names it)
  mode          auto | exact | naive
                                    the default for NAIVE / EXACT; auto picks the
                                    fastest exact plan
  executor      local | ray         who runs a multi-image query (FROM a folder)
  ray_address   '' | 'auto' | 'host:port' | 'ray://host:10001'
                                    the Ray cluster; '' starts a local instance
  workers       <int>               Ray actors; 0 (default) one per threads CPUs
  threads       <int>               torch threads per image in a multi-image
                                    query; 0 (default) torch's default
Example:
  SET memory_limit = '2GB';"""

_HELP = """\
HELP [<topic>]

Without a topic, lists the statements. With one, shows its syntax and an
example. Topics: {topics}.
Example:
  HELP COLOR;"""

_WEIGHTS = """\
WEIGHTS '<file>'

Loads the model's weights from a state-dict file instead of the pretrained
ones (SELECT and DESCRIBE).
Example:
  SELECT HEATMAP FROM cat USING resnet18 WEIGHTS 'resnet18_cats.pt' PATCH 16 STRIDE 4;"""

_PATCH = """\
PATCH <n>[x<m>]

The occlusion patch size in pixels of the model input, height x width:
PATCH 16 is 16x16, PATCH 16x8 is 16 rows by 8 columns. Required in SELECT.
Example:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16x8 STRIDE 4;"""

_STRIDE = """\
STRIDE <n>[x<m>]

How far the patch moves between positions, height x width: STRIDE 4 moves
4 pixels down and across, STRIDE 8x4 moves 8 down and 4 across. A smaller
stride gives a finer heatmap and more positions to compute. Required in SELECT.
Example:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 8x4;"""

_COLOR = """\
COLOR BLACK | GRAY | GREY | MEAN | <number> | (<r>, <g>, <b>)

The patch colour. Numbers are intensities on the 0-255 pixel scale; MEAN is
the image's per-channel mean. The default is GRAY.
Example:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 COLOR (255, 0, 0);"""

_LABEL = """\
LABEL <index> | '<class name>' | PREDICTED
LABEL <label>, <label>, ... | LABEL TOP <k> | LABEL ALL

Which class probability the heatmap shows: a class index, a class name
(matched case-insensitively), or the class the model predicts for the
unoccluded image (the default). Several classes -- a list, the k most
probable, or every class -- come from one run, a map each.
Examples:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 LABEL 'tabby';
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 LABEL TOP 5;"""

_REGION = """\
REGION (<x0>, <y0>, <x1>, <y1>)

Occludes only inside a crop of the model input: x0 <= x < x1 and
y0 <= y < y1, in pixels. Note the order: x before y here, while sizes are
height x width.
Example:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 8 STRIDE 2 REGION (64, 32, 160, 128);"""

_MODE = """\
NAIVE | EXACT | APPROX ...

NAIVE re-runs the whole model for every patch position. EXACT recomputes
only the part of each layer the patch changes and gives the same heatmap.
APPROX caps that part for more speed (HELP APPROX).
Without any, the mode setting decides (auto: the fastest exact plan).
Example:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 NAIVE;"""

_APPROX = """\
APPROX TAU <t> | APPROX SSIM <s>

Approximate incremental inference (projective-field thresholding): every
conv and pooling layer recomputes at most round(t x size) rows and columns
around the patch and takes the rest from the unoccluded image. TAU gives t
(0 < t <= 1, 1 = EXACT).

SSIM s is a promise: the heatmap has SSIM >= s against the exact one, as far
as KQL can predict and check. From a TUNE calibration it predicts SSIM and
time of each plan -- a threshold t, DRILLDOWN (when written), adaptive
refinement (a lattice of positions, then batches where the estimated error
is largest, until its run-time SSIM estimate reaches s plus a calibrated
margin), gate freezing on a model with squeeze-and-excitation gates (see
GATES) -- and runs the fastest that meets s; none: EXACT, with a warning.
Without a calibration the query runs EXACT and says which TUNE to run.
EXPLAIN lists the plans considered; EXPLAIN ANALYZE the refinement stages.
Examples:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 APPROX TAU 0.5;
  SELECT HEATMAP FROM cat USING efficientnet_lite0 PATCH 16 STRIDE 4 APPROX SSIM 0.9;"""

_DRILLDOWN = """\
DRILLDOWN [FRACTION <r>] [SPEEDUP <t>]

Adaptive drill-down: a first pass at a coarser stride, then the query's
stride on the fraction r (default 0.25) of the positions with the largest
probability drop. The coarse stride is chosen for a speedup t (default 3)
over the whole grid; t must be below 1/r. Works with NAIVE, EXACT and APPROX.
With APPROX SSIM it is a permission, never a licence to miss the target: it
runs only when its predicted SSIM meets it (else a warning says what ran).
Example:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 APPROX TAU 0.5 DRILLDOWN;"""

_GATES = """\
GATES EXACT | LOCAL | FROZEN      (with APPROX TAU <t> or APPROX SSIM <s>)

How squeeze-and-excitation gates are approximated. LOCAL recomputes a gate
but applies it only where the patch changed the map; FROZEN keeps every gate
at its unoccluded value; EXACT (the default) is exact. APPROX TAU 1 GATES
LOCAL approximates the gates only. APPROX SSIM s considers both modes, alone
and with a tuned t, when TUNE measured them; written with APPROX SSIM, GATES
LOCAL or FROZEN allows only that mode and GATES EXACT none (never a licence to
miss s).
Example:
  SELECT HEATMAP FROM cat USING efficientnet_b0 PATCH 16 STRIDE 4 APPROX TAU 1 GATES LOCAL;"""

_BATCH = """\
BATCH <n>

How many occluded images go through the model at once. Without it the
batch_size setting decides (0: sized from memory_limit).
Example:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 BATCH 64;"""

_DEVICE = """\
ON CPU | CUDA

Where this query runs; without it, the device setting decides.
Example:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 ON CUDA;"""

_INTO = """\
INTO '<file>' | '<folder>'

Writes the heatmap to a file: '.png' for an image, '.npy' for the array of
probabilities. When FROM names a folder or a glob, INTO names a folder: it
gets <image>.npy and <image>.png per image and manifest.jsonl, one line per
image; rerunning the query skips the images already done.
Examples:
  SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRIDE 4 INTO 'cat_heatmap.png';
  SELECT HEATMAP FROM 'scans/*.png' USING vgg16 PATCH 16 STRIDE 4 INTO 'heatmaps/';"""

_VOLUMES = """\
SELECT HEATMAP FROM <volume> USING <3-D model> PATCH <n>[x<h>x<w>] STRIDE <n>[x<h>x<w>]
    [WINDOW (<lo>, <hi>)] [NORMALIZE MINMAX | ZSCORE | NONE] [RESAMPLE <d>x<h>x<w>]
    [COLOR <value in the scan's units> | MEAN] [REGION (<x0>, <y0>, <z0>, <x1>, <y1>, <z1>)]
    [INTO '<file>.nii.gz' | '<file>.nii' | '<file>.npy' | '<file>.png']

Occludes a CT / MRI volume or a video clip (C x D x H x W) with a box. <volume> is
a .npy file (DxHxW or CxDxHxW), a NIfTI file (.nii, .nii.gz), a bound array or the
synthetic sample 'phantom' (64^3, Hounsfield units). 3-D models: densenet121_3d,
densenet169_3d, resnet10_3d ... resnet50_3d (MONAI, kql[monai]), r3d_18, mc3_18,
r2plus1d_18 (torchvision video), or a bound module with nn.Conv3d.
Sizes are depth x height x width; PATCH 8 is 8x8x8. RESAMPLE resamples the grid
(trilinear), WINDOW clips to [lo, hi] and scales to [0, 1], NORMALIZE scales the
scan (default MINMAX; uint8 clips are divided by 255). COLOR -1000 is air in a
CT. INTO NIfTI writes the map in the input's voxel grid with its affine; PNG
shows three slices through the most sensitive voxel. TUNE on volumes makes
APPROX SSIM s work on them as on images (HELP TUNE).
Example:
  SELECT HEATMAP FROM phantom USING resnet10_3d PATCH 8 STRIDE 4
      WINDOW (-1000, 400) RESAMPLE 32 INTO 'phantom.nii.gz';"""

TOPICS: dict[str, str] = {
    "SELECT": _SELECT,
    "EXPLAIN": _EXPLAIN,
    "DESCRIBE": _DESCRIBE,
    "SHOW": _SHOW,
    "TUNE": _TUNE,
    "CALIBRATIONS": _CALIBRATIONS,
    "LOAD": _LOAD,
    "SET": _SET,
    "HELP": _HELP,
    "WEIGHTS": _WEIGHTS,
    "PATCH": _PATCH,
    "STRIDE": _STRIDE,
    "COLOR": _COLOR,
    "LABEL": _LABEL,
    "REGION": _REGION,
    "NAIVE": _MODE,
    "EXACT": _MODE,
    "APPROX": _APPROX,
    "TAU": _APPROX,
    "SSIM": _APPROX,
    "DRILLDOWN": _DRILLDOWN,
    "GATES": _GATES,
    "BATCH": _BATCH,
    "ON": _DEVICE,
    "INTO": _INTO,
    "VOLUMES": _VOLUMES,
    "WINDOW": _VOLUMES,
    "NORMALIZE": _VOLUMES,
    "RESAMPLE": _VOLUMES,
}
"""Help topics (upper case) and their text."""


def help_text(topic: Optional[str] = None) -> str:
    """The text of ``HELP`` (``topic=None``) or ``HELP <topic>``.

    Args:
        topic: a statement or SELECT clause keyword, any case; ``None`` for
            the overview.

    Raises:
        KqlError: the topic is unknown; the message lists the topics.
    """
    names = ", ".join(sorted(TOPICS))
    if topic is None:
        return _OVERVIEW.format(topics=names)
    text = TOPICS.get(topic.strip().upper())
    if text is None:
        raise KqlError(f"unknown HELP topic {topic!r}; topics: {names}")
    return text.format(topics=names) if text is _HELP else text
