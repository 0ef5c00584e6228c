"""Command-line flags, the papers' recipes as presets, and the checks made before any work starts.

    python -m train.main --arch v2 --width 1.0                       # digits, the default recipe
    python -m train.main --preset v2-paper --dataset imagenet2012    # Sandler et al.'s ImageNet recipe
    python -m train.main --preset torchvision-sgd --lr 0.09          # a preset, one value changed

Each flag is a field of `Config`, where its name, default, type and help are written once;
`build_parser` reads them from there. A preset only changes the flags' defaults: any flag given on
the command line wins over it. Nothing here imports jax or torch: the command-line tools parse and
check their flags first, so a bad flag fails in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Sequence

import mobilenet_arch
from toolkit.cli import ArgumentParser
from train import augment, datasets


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def head_units(text: str) -> tuple[int, ...]:
    """--head's value: '256', '512,256' (hidden layers' units, first to last), or 'none' (no
    hidden layer)."""
    if text.strip().lower() == "none":
        return ()
    try:
        units = tuple(int(part) for part in text.split(","))
    except ValueError:
        units = ()
    if not units or min(units) < 1:
        raise argparse.ArgumentTypeError(f"expected the hidden layers' units, comma-separated positive integers such as 256 or 512,256 (or none), got {text!r}")
    return units


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


# The published ImageNet recipes. Values the papers do not state are marked.
PRESETS: dict[str, dict[str, Any]] = {
    # Sandler et al. 2018, Section 6.1: "RMSPropOptimizer with decay and momentum set to 0.9 ...
    # weight decay 0.00004 ... initial learning rate of 0.045, and learning rate decay rate of
    # 0.98 per epoch ... 16 GPU asynchronous workers, and a batch size of 96". We train
    # synchronously with the per-worker batch; TF's RMSProp puts eps inside the sqrt and starts
    # its mean square at 1, ours is torch's (see train/optim.py): eps 1e-3 is timm's choice for
    # reproducing the TF recipe with a torch-style RMSprop. Epochs: not stated (300 is common).
    "v2-paper": dict(
        arch="v2",
        dataset="imagenet2012",
        resolution=224,
        epochs=300,
        batch_size=96,
        optimizer="rmsprop",
        lr=0.045,
        momentum=0.9,
        nesterov=False,
        rmsprop_decay=0.9,
        rmsprop_eps=1e-3,
        schedule="exponential",
        lr_decay_rate=0.98,
        warmup_epochs=0.0,
        weight_decay=4e-5,
        depthwise_weight_decay=None,
        label_smoothing=0.0,
    ),
    # torchvision's reference recipe for mobilenet_v2 (references/classification/README.md):
    # `--epochs 300 --lr 0.045 --wd 0.00004 --lr-step-size 1 --lr-gamma 0.98`, SGD momentum 0.9,
    # 8 GPUs x batch 32.
    "torchvision-sgd": dict(
        arch="v2",
        dataset="imagenet2012",
        resolution=224,
        epochs=300,
        batch_size=256,
        optimizer="sgd",
        lr=0.045,
        momentum=0.9,
        nesterov=False,
        schedule="exponential",
        lr_decay_rate=0.98,
        warmup_epochs=0.0,
        weight_decay=4e-5,
        depthwise_weight_decay=None,
        label_smoothing=0.0,
    ),
}
# Howard et al. 2017, Section 4: "RMSprop with asynchronous gradient descent similar to
# Inception V3 ... very little or no weight decay (l2 regularization) on the depthwise
# filters since there are so few parameters in them". Learning rate, decay and batch are not
# stated: these are the V2 paper's, which says it follows the V1 set-up.
PRESETS["v1-paper"] = {**PRESETS["v2-paper"], "arch": "v1", "depthwise_weight_decay": 0.0}


def flag(
    default: Any,
    help: str,
    group: str | None = None,
    *,
    type: Callable[[str], Any] | None = None,
    choices: Sequence[str] | None = None,
    metavar: tuple[str, ...] | None = None,
) -> Any:
    """A `Config` field that is also the flag --NAME (its underscores as dashes): its default, its
    help, the --help section it is listed in, and how its text is read (`type` or `choices`; a
    bool is --NAME/--no-NAME; a `metavar` tuple makes it take that many values, a tuple)."""
    metadata = {"help": help, "group": group, "type": type, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


# The sections of --help, in the order of Config's fields.
MODEL, DATA, OPTIMIZER, RUN = "model", "data", "schedule and optimizer", "run"
FINE_TUNING = "fine-tuning (pretrained weights, frozen layers, parameter groups)"
AUGMENT = "augmentation and preprocessing (torchvision's transforms; all but --mean/--std for --dataset DIR only)"
MULTI_HOST = "multi-host (jax.distributed; also detected from SLURM/Open MPI/TPU/Kubernetes environment variables)"


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run; each field is a flag of `python -m train.main` (`batch_size` is --batch-size).

    The defaults are the default recipe, tuned for the default dataset (scikit-learn's digits at
    32x32) to pass 97% test accuracy within a few minutes on a 2-core CPU.
    """

    preset: str | None = flag(None, "start from a paper's ImageNet recipe; explicit flags override it", choices=sorted(PRESETS))

    # None only with --init-from, whose checkpoint then says (parse_config, train.main.plan).
    arch: str | None = flag(
        "v2", "MobileNetV1 or MobileNetV2 (with --init-from: the checkpoint's, which another value contradicts)", MODEL, choices=mobilenet_arch.ARCHS
    )
    width: float | None = flag(1.0, "width multiplier alpha (with --init-from: the checkpoint's)", MODEL, type=positive_float)
    resolution: int | None = flag(
        None, "input side in pixels (default: the dataset's own; at least the network's total stride, 32)", MODEL, type=positive_int
    )
    dropout: float | None = flag(
        None, "dropout before the classifier (default: the architecture's, 0.2 for V2)", MODEL, type=non_negative_float
    )
    head: tuple[int, ...] | None = flag(
        None,
        "hidden dense layers between the pooled features and the classifier, their units first to last: 256, 512,256, "
        "or none (default: none; with --init-from the checkpoint's head; given with it, a new head replaces the checkpoint's)",
        MODEL,
        type=head_units,
    )
    head_activation: str = flag("relu", "activation after each --head layer", MODEL, choices=mobilenet_arch.DENSE_ACTIVATIONS)
    head_dropout: float | None = flag(
        None, "dropout before each head layer after the first (--dropout is the one before the first; default 0)", MODEL, type=non_negative_float
    )
    precision: str = flag("fp32", "computation dtype; parameters stay float32", MODEL, choices=("fp32", "bf16"))

    init_from: str | None = flag(
        None,
        "start from these weights: anything parity.load reads (.pth/.safetensors of torchvision or timm, .msgpack, "
        ".keras/.h5, a Hugging Face folder); the architecture comes from them, the head too when the class count "
        "matches (else a new output layer after its hidden layers; --head: a new head), and the preprocessing unless "
        "--mean/--std/--interpolation/--eval-* say",
        FINE_TUNING,
    )
    freeze: str | None = flag(
        None,
        "'backbone': train the head only (its hidden layers and the classifier); frozen layers run BatchNorm in inference mode, so nothing in them changes",
        FINE_TUNING,
        choices=("backbone",),
    )
    trainable_blocks: int | None = flag(
        None, "train the last N blocks of features and the head; the blocks before them are frozen as by --freeze", FINE_TUNING, type=non_negative_int
    )
    backbone_lr_mult: float = flag(
        1.0, "the learning rate of features (the backbone) is --lr times this, the head's --lr (parameter groups)", FINE_TUNING, type=non_negative_float
    )

    dataset: str = flag(
        "digits",
        "'digits' (bundled with scikit-learn), a prepared TFDS name (cifar10, imagenette, imagenet2012, ...), or a folder "
        "DIR of images in torchvision's ImageFolder layout: DIR/train/CLASS/*.jpg (or png, bmp, webp, ...) and DIR/val/ or DIR/test/",
        DATA,
    )
    data_dir: str | None = flag(None, "TFDS data directory (default: TFDS's own)", DATA)
    batch_size: int = flag(64, "global batch size, over all devices and hosts", DATA, type=positive_int)
    data_workers: int | None = flag(
        None,
        "--dataset DIR: processes decoding the images (grain workers; default 0: threads of the training process, one per CPU core)",
        DATA,
        type=non_negative_int,
    )

    # torchvision's usual ImageNet training recipe: RandomResizedCrop, RandomHorizontalFlip, then
    # optional RandomRotation and ColorJitter; evaluation Resize then CenterCrop.
    crop_scale: tuple[float, float] = flag(
        augment.DEFAULTS["crop_scale"], "random resized crop: range of the crop's area, a fraction of the image's", AUGMENT, type=positive_float, metavar=("MIN", "MAX")
    )
    crop_ratio: tuple[float, float] = flag(
        augment.DEFAULTS["crop_ratio"], "random resized crop: range of the crop's aspect ratio, width / height", AUGMENT, type=positive_float, metavar=("MIN", "MAX")
    )
    hflip: float = flag(augment.DEFAULTS["hflip"], "probability of a horizontal flip", AUGMENT, type=non_negative_float)
    rotation: float = flag(augment.DEFAULTS["rotation"], "rotate by an angle drawn from [-x, x] degrees (RandomRotation)", AUGMENT, type=non_negative_float)
    brightness: float = flag(augment.DEFAULTS["brightness"], "colour jitter: brightness factor drawn from [max(0, 1 - x), 1 + x] (ColorJitter)", AUGMENT, type=non_negative_float)
    contrast: float = flag(augment.DEFAULTS["contrast"], "colour jitter: contrast factor drawn from [max(0, 1 - x), 1 + x]", AUGMENT, type=non_negative_float)
    saturation: float = flag(augment.DEFAULTS["saturation"], "colour jitter: saturation factor drawn from [max(0, 1 - x), 1 + x]", AUGMENT, type=non_negative_float)
    hue: float = flag(augment.DEFAULTS["hue"], "colour jitter: hue shift drawn from [-x, x], x at most 0.5", AUGMENT, type=non_negative_float)
    mean: tuple[float, float, float] | None = flag(
        None, "normalisation mean of R, G, B on the 0..1 scale (default: the --init-from checkpoint's, else ImageNet's)", AUGMENT, type=float, metavar=("R", "G", "B")
    )
    std: tuple[float, float, float] | None = flag(
        None, "normalisation standard deviation of R, G, B on the 0..1 scale (default: the checkpoint's, else ImageNet's)", AUGMENT, type=positive_float, metavar=("R", "G", "B")
    )
    interpolation: str | None = flag(
        None, "resizing filter (default: the checkpoint's, else bilinear)", AUGMENT, choices=("nearest", "bilinear", "bicubic")
    )
    eval_resize: int | None = flag(
        None,
        "evaluation: resize the shorter side to this (default: --resolution / 0.875, or the checkpoint's ratio of resize to crop)",
        AUGMENT,
        type=positive_int,
    )
    eval_crop: int | None = flag(None, "evaluation: then keep the centre square of this side (default: --resolution)", AUGMENT, type=positive_int)
    jpeg_draft: bool = flag(
        augment.DEFAULTS["jpeg_draft"], "decode a JPEG at 1/2, 1/4 or 1/8 of its size when the crop needs no more pixels (PIL's draft mode: faster)", AUGMENT
    )

    # 15 epochs, not 12: training is chaotic, and at 12 one of seeds 0, 1, 2 ended under 97%
    # (`python -m train.main --epochs 12 --seed 0`: 96.9%).
    epochs: int = flag(15, "training epochs", OPTIMIZER, type=positive_int)
    max_steps: int | None = flag(
        None, "stop after this many steps in all (the schedule still spans --epochs)", OPTIMIZER, type=positive_int
    )
    optimizer: str = flag(
        "sgd", "torch.optim.SGD, RMSprop or AdamW semantics, in both frameworks", OPTIMIZER, choices=("sgd", "rmsprop", "adamw")
    )
    lr: float = flag(0.04, "peak learning rate", OPTIMIZER, type=positive_float)
    momentum: float = flag(0.9, "momentum (SGD and RMSprop)", OPTIMIZER, type=non_negative_float)
    nesterov: bool = flag(False, "Nesterov momentum (SGD)", OPTIMIZER)
    rmsprop_decay: float = flag(0.9, "RMSprop's moving-average decay (torch's alpha)", OPTIMIZER, type=non_negative_float)
    rmsprop_eps: float = flag(1e-3, "RMSprop's epsilon, added outside the square root as torch does", OPTIMIZER, type=positive_float)
    rmsprop_centered: bool = flag(False, "centred RMSprop (divide by the variance estimate)", OPTIMIZER)
    schedule: str = flag(
        "cosine",
        "learning-rate schedule after warm-up, stepped every step",
        OPTIMIZER,
        choices=("cosine", "exponential", "constant"),
    )
    warmup_epochs: float = flag(1.0, "linear warm-up from 0 to --lr, in epochs", OPTIMIZER, type=non_negative_float)
    lr_decay_rate: float = flag(0.98, "--schedule exponential: factor per epoch", OPTIMIZER, type=positive_float)
    weight_decay: float = flag(
        5e-5,
        "weight decay on all parameters: L2 added to the gradient (torch's coupled weight_decay) for sgd and rmsprop, "
        "decoupled (torch.optim.AdamW's, lr * decay * weight) for adamw",
        OPTIMIZER,
        type=non_negative_float,
    )
    depthwise_weight_decay: float | None = flag(
        None,
        "weight decay on depthwise filters (default: --weight-decay; the V1 paper uses little or none)",
        OPTIMIZER,
        type=non_negative_float,
    )
    label_smoothing: float = flag(0.1, "label smoothing of the training loss", OPTIMIZER, type=non_negative_float)
    clip_grad_norm: float | None = flag(
        None, "scale the gradients down to this global norm when above it (torch.nn.utils.clip_grad_norm_)", OPTIMIZER, type=positive_float
    )

    framework: str = flag("jax", "train the Flax model, or torch_ref on the same batches", RUN, choices=("jax", "torch"))
    workdir: str = flag(
        "workdir",
        "metrics.jsonl, curves.png, checkpoints/, model.msgpack and model.pth go here; a run resumes from its latest checkpoint",
        RUN,
    )
    seed: int = flag(0, "seeds the initialisation, the data order and dropout", RUN, type=int)
    log_every: int = flag(10, "write train_loss to metrics.jsonl every this many steps", RUN, type=positive_int)
    eval_every: int = flag(1, "evaluate every this many epochs (and at the end)", RUN, type=positive_int)
    checkpoint_every: int | None = flag(
        None, "checkpoint every this many steps (default: every epoch)", RUN, type=positive_int
    )
    keep_checkpoints: int = flag(
        2,
        "checkpoints kept in WORKDIR/checkpoints (orbax, JAX; --framework torch keeps the latest only)",
        RUN,
        type=positive_int,
    )
    progress: bool = flag(True, "show a progress bar", RUN)

    coordinator_address: str | None = flag(None, "host:port of process 0", MULTI_HOST)
    num_processes: int | None = flag(None, "number of processes in the job", MULTI_HOST, type=positive_int)
    process_id: int | None = flag(None, "this process's index, 0..num_processes-1", MULTI_HOST, type=int)

    @property
    def dw_weight_decay(self) -> float:
        return self.weight_decay if self.depthwise_weight_decay is None else self.depthwise_weight_decay


def frozen_block_count(config: Config, num_blocks: int) -> int:
    """How many blocks of `features`, from the stem on, --freeze or --trainable-blocks freezes."""
    if config.freeze == "backbone":
        return num_blocks
    if config.trainable_blocks is not None:
        return max(num_blocks - config.trainable_blocks, 0)
    return 0


FIELDS: dict[str, dataclasses.Field] = {field.name: field for field in dataclasses.fields(Config)}


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, **overrides: Any) -> None:
    """Add the `Config` field `name` to `parser` (or to one of its groups) as its flag;
    `overrides` replace what `add_argument` gets from the field (another tool's default or help,
    `required=True`)."""
    field = FIELDS[name]
    kwargs: dict[str, Any] = {"default": field.default, "help": field.metadata["help"]}
    if isinstance(field.default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    for key in ("type", "choices", "metavar"):
        if field.metadata[key] is not None:
            kwargs[key] = field.metadata[key]
    if field.metadata["metavar"] is not None:
        kwargs["nargs"] = len(field.metadata["metavar"])
    parser.add_argument(f"--{name.replace('_', '-')}", **{**kwargs, **overrides})


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python -m train.main`: one per `Config` field, in its section of --help."""
    parser = ArgumentParser(
        prog="python -m train.main",
        description="Train MobileNetV1/V2 in JAX (or the PyTorch reference on the same batches).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sections: dict[str | None, Any] = {None: parser}
    for field in FIELDS.values():
        group = field.metadata["group"]
        if group not in sections:
            sections[group] = parser.add_argument_group(group)
        add_flag(sections[group], field.name)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Flags -> Config: preset values first, explicit flags over them. Bad values exit 2 with a
    one-line error."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    # The architecture flags start unset, so that a checkpoint (--init-from) can tell apart what
    # was asked for from a default.
    unset = object()
    args = parser.parse_args(argv, namespace=argparse.Namespace(arch=unset, width=unset))
    for name in ("arch", "width"):
        if getattr(args, name) is unset:
            setattr(args, name, None if args.init_from else parser.get_default(name))
    config = Config(**{key: tuple(value) if isinstance(value, list) else value for key, value in vars(args).items()})
    problem = static_problem(config)
    if problem:
        parser.error(problem)
    return config


def static_problem(config: Config) -> str | None:
    """What is wrong with the flags on their own (the dataset and devices are checked in main)."""
    if config.arch not in mobilenet_arch.ARCHS and not (config.arch is None and config.init_from):
        return f"unknown --arch {config.arch!r}: expected one of {', '.join(mobilenet_arch.ARCHS)}"
    if config.resolution is not None and config.arch is not None and (problem := resolution_problem(config.arch, config.resolution)):
        return problem
    if config.freeze and config.trainable_blocks is not None:
        return f"--freeze {config.freeze} and --trainable-blocks {config.trainable_blocks} say the same thing twice: give one"
    if config.dropout is not None and config.dropout >= 1:
        return f"--dropout {config.dropout}: expected a value in [0, 1)"
    if config.head_dropout is not None and config.head_dropout >= 1:
        return f"--head-dropout {config.head_dropout}: expected a value in [0, 1)"
    if config.head_activation != FIELDS["head_activation"].default and not config.head:
        return f"--head-activation {config.head_activation} applies to the hidden layers --head adds: give --head too (e.g. --head 256)"
    if config.head_dropout is not None and config.head is not None and not config.head:
        return "--head-dropout applies to the layers after the first, and --head none leaves one: give --head 256 or leave --head-dropout out"
    if config.head_dropout is not None and config.head is None and not config.init_from:
        return "--head-dropout applies to the layers after the first: give --head (e.g. --head 256) for hidden layers"
    if config.label_smoothing >= 1:
        return f"--label-smoothing {config.label_smoothing}: expected a value in [0, 1)"
    if (config.num_processes is None) != (config.process_id is None):
        return "--num-processes and --process-id go together"
    if config.num_processes is not None and not 0 <= config.process_id < config.num_processes:
        return f"--process-id {config.process_id} is not in 0..{config.num_processes - 1}"
    if config.framework == "torch" and (config.num_processes or 1) > 1:
        return "--framework torch runs in one process; multi-host training is for --framework jax"
    return augmentation_problem(config)


# What the folder pipeline alone reads: the recipe's flags but the normalisation (any dataset's),
# and its workers. Digits and TFDS datasets keep their own fixed recipe.
FOLDER_ONLY = ("data_workers", *(f.name for f in dataclasses.fields(augment.Recipe) if f.name in FIELDS and f.name not in ("mean", "std")))


def augmentation_problem(config: Config) -> str | None:
    """Why the augmentation and preprocessing flags do not fit together or the dataset, or None."""
    for name in ("crop_scale", "crop_ratio"):
        low, high = getattr(config, name)
        if low > high:
            return f"--{name.replace('_', '-')} {low} {high}: expected MIN <= MAX"
    if config.crop_scale[1] > 1:
        return f"--crop-scale {config.crop_scale[0]} {config.crop_scale[1]}: expected fractions of the image, at most 1"
    if config.hflip > 1:
        return f"--hflip {config.hflip}: expected a probability in [0, 1]"
    if config.hue > 0.5:
        return f"--hue {config.hue}: expected a value in [0, 0.5] (a shift of half the hue circle)"
    if not datasets.is_folder(config.dataset):
        changed = [name for name in FOLDER_ONLY if getattr(config, name) != FIELDS[name].default]
        if changed:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in changed)
            return f"{flags} applies to an image folder (--dataset DIR); {config.dataset!r} keeps its own fixed recipe"
    return None


def min_resolution(arch: str) -> int:
    return mobilenet_arch.total_stride(mobilenet_arch.architecture(arch))


def resolution_problem(arch: str, resolution: int) -> str | None:
    """Why `arch` cannot take `resolution`-pixel inputs (smaller than its total stride), or None."""
    minimum = min_resolution(arch)
    if resolution < minimum:
        return f"resolution {resolution} is too small for MobileNet{arch.upper()}: expected at least {minimum} (its total stride)"
    return None
