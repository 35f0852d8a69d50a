"""The job spec: what a weak-to-strong experiment is, as a validated pydantic v2 model.

The spec is user input and keeps ``None`` for "use the default"; :func:`resolve_training` turns a
model's options into a concrete :class:`TrainConfig`, which is what stage keys hash. Keeping the two
apart lets the student stages inherit the strong model's *explicit* choices without inheriting
defaults that depend on a mode the transfer overrides.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from w2s.safe_text import check_name

Mode = Literal["full", "probe", "lora"]
Optimizer = Literal["adam", "adafactor"]
Schedule = Literal["cosine", "constant"]
DType = Literal["auto", "float32", "tf32", "bfloat16", "float16"]
Pooling = Literal["auto", "last", "mean"]
Truncation = Literal["drop", "left", "right"]
StepsRounding = Literal["up", "down"]
BatchOrder = Literal["bucketed", "sequential"]
Sampling = Literal["random", "reference"]
Preset = Literal["reference"]

# Upper bounds on sizes a request can ask for: far above any real experiment, low enough that a typo
# (or a fuzzer) cannot ask the service for a billion stages or overflow a 32-bit database column.
MAX_SEED = 2**31 - 1
MAX_EXAMPLES = 100_000_000
MAX_CHAIN, MAX_LOSSES, MAX_SEEDS = 6, 50, 100  # list lengths a spec allows

# Defaults that depend on the training mode: a linear probe on frozen features wants a much larger
# learning rate and more passes than fine-tuning the whole network.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"lr": 5e-5, "epochs": 2},
    "lora": {"lr": 2e-4, "epochs": 2},
    "probe": {"lr": 1e-3, "epochs": 30},
}

# ``"preset": "reference"``: the training defaults of openai/weak-to-strong (train_weak_to_strong.py,
# weak_to_strong/train.py and model.py), for every mode. Explicit fields in the spec still win. See
# docs/fidelity.md for each choice and why this project's own defaults differ.
REFERENCE_TRAINING: dict[str, Any] = {
    "epochs": 2,  # gt_epochs = transfer_epochs = 2
    "batch_size": 32,
    "optimizer": "adam",  # torch Adam; AdamW with weight decay 0 is the same update
    "lr_schedule": "cosine",  # CosineAnnealingLR(optimizer, nsteps): no warm-up, decays to 0
    "warmup_frac": 0.0,
    "weight_decay": 0.0,
    "max_length": 1023,  # max_ctx 1024 keeps examples with len(input_ids) < 1024
    "truncation": "drop",  # tokenize_dataset filters longer examples out
    "steps_rounding": "down",  # nsteps = len(ds) * epochs // batch_size
    "batch_order": "sequential",  # the shuffled dataset, repeated epochs times, no reshuffle
    "head_bias": False,  # Linear(hidden, 2, bias=False), zero-initialised
    "train_dropout": False,  # model.eval() while training unless train_with_dropout
    "deterministic": True,  # reproducible on a GPU as well (the reference seeds everything)
}
REFERENCE_DATASET: dict[str, Any] = {"sampling": "reference", "resample_per_seed": True}
# The reference's learning rates by model size (MODEL_CONFIGS): 5e-5 for gpt2 (124M) and gpt2-medium
# (355M), 1e-5 for gpt2-large (774M) and everything larger.
REFERENCE_LR_SMALL, REFERENCE_LR_LARGE, REFERENCE_LR_SPLIT_PARAMS = 5e-5, 1e-5, 500_000_000


def reference_lr(parameters: int) -> float:
    """The reference's default learning rate for a model of this many parameters."""
    return REFERENCE_LR_SMALL if parameters < REFERENCE_LR_SPLIT_PARAMS else REFERENCE_LR_LARGE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingOptions(_Strict):
    """Hyperparameters of one fine-tuning run. ``None`` means the documented default."""

    mode: Mode | None = Field(None, description="full | probe | lora (default full)")
    lr: float | None = Field(None, gt=0, le=1, description="peak learning rate (default by mode)")
    epochs: float | None = Field(None, gt=0, le=1000, description="passes over the data (default by mode)")
    batch_size: int | None = Field(None, ge=1, le=4096, description="examples per optimizer step (32)")
    minibatch_size: int | None = Field(
        None, ge=1, le=4096, description="examples per forward pass; gradient accumulation (= batch_size)"
    )
    max_length: int | None = Field(
        None, ge=8, le=32768, description="longest input in tokens, special tokens included (512)"
    )
    truncation: Truncation | None = Field(
        None,
        description="texts longer than max_length: drop the example (as the reference) | left: cut "
        "tokens from the start, keeping the end | right: cut from the end (drop)",
    )
    optimizer: Optimizer | None = Field(None, description="adam (AdamW) | adafactor (default adam)")
    lr_schedule: Schedule | None = Field(None, description="cosine | constant, after warmup (cosine)")
    warmup_frac: float | None = Field(None, ge=0, le=1, description="fraction of steps warming up (0.05)")
    weight_decay: float | None = Field(
        None, ge=0, le=1, description="AdamW weight decay, the L2 pull on trained weights (0.0)"
    )
    holdout_frac: float | None = Field(
        None,
        ge=0,
        le=0.5,
        description="share of the training rows held out to choose when to stop, with the labels the "
        "stage trains on (weak labels for students); 0: no hold-out (0, or 0.1 with "
        "early_stopping_patience)",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="stop after this many epochs without a lower held-out loss and keep the best "
        "epoch's weights; needs holdout_frac > 0 (3 when holdout_frac > 0)",
    )
    dtype: DType | None = Field(
        None,
        description="auto: bf16 autocast on a GPU, float32 on the CPU | float32 | tf32: float32 with "
        "TensorFloat-32 matmuls on a GPU (float32 on the CPU) | bfloat16 | float16: autocast; trained "
        "weights stay float32 in every case (auto)",
    )
    deterministic: bool | None = Field(
        None,
        description="deterministic GPU kernels (torch.use_deterministic_algorithms, a fixed cuBLAS "
        "workspace): a rerun on the same GPU model and software gives the same numbers, a little "
        "slower; CPU runs are repeatable either way (false; preset reference: true)",
    )
    gradient_checkpointing: bool | None = Field(None, description="trade compute for memory (false)")
    lora_rank: int | None = Field(None, ge=1, le=1024, description="LoRA rank in lora mode (8)")
    lora_alpha: float | None = Field(
        None, gt=0, le=10_000, description="LoRA alpha, in (0, 10000] (2 x rank)"
    )
    eval_every: int | None = Field(
        None,
        ge=0,
        le=10_000_000,
        description="evaluate on the test set every N steps, N <= 10^7; 0 = only at the end (0)",
    )
    save_checkpoint: bool | None = Field(None, description="keep the trained weights in the artifact store")
    train_dropout: bool | None = Field(
        None, description="dropout on while training (false: the model trains in eval mode, as the reference)"
    )
    head_bias: bool | None = Field(None, description="the linear head has a bias (true; the reference: none)")
    steps_rounding: StepsRounding | None = Field(
        None, description="optimizer steps = rows x epochs / batch_size, rounded up | down (reference) (up)"
    )
    batch_order: BatchOrder | None = Field(
        None,
        description="bucketed: reshuffled every epoch, batches of similar length | sequential: the "
        "sample's order every epoch, as the reference (bucketed)",
    )

    @model_validator(mode="after")
    def _minibatch_divides_batch(self) -> TrainingOptions:
        if self.batch_size and self.minibatch_size and self.batch_size % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size}); "
                "gradient accumulation runs batch_size / minibatch_size forward passes per step"
            )
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_a_holdout(self) -> TrainingOptions:
        if self.early_stopping_patience is not None and self.holdout_frac == 0:
            raise ValueError(
                "early_stopping_patience needs held-out rows to watch, but holdout_frac is 0; set "
                "holdout_frac (e.g. 0.1) or remove early_stopping_patience"
            )
        return self


class ModelSpec(TrainingOptions):
    """One model (weak or strong) and how to train it."""

    model: str = Field(
        ..., min_length=1, max_length=1000, description="Hugging Face hub id or a local model directory"
    )
    revision: str | None = Field(None, max_length=200, description="hub revision (branch, tag or commit)")
    pooling: Pooling = Field(
        "auto", description="auto: last real token for decoder LMs, mean over tokens for encoders"
    )
    trust_remote_code: bool = Field(False, description="run model code from the hub; off unless asked")

    @field_validator("model", "revision")
    def _printable(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Model ids end up in listings and terminals (w2s list, w2s-service jobs): no escapes in them.
        return value if value is None else check_name(value, str(info.field_name))

    @field_validator("model")
    def _model_looks_like_a_model(cls, value: str) -> str:
        if is_local_model_name(value) and not _is_directory(value):
            raise ValueError(
                f"local model directory {value!r} does not exist; give an existing directory "
                "or a Hugging Face hub id such as 'gpt2'"
            )
        return value


def is_local_model_name(value: str) -> bool:
    """Whether a model name is a local directory (absolute, ``./``, ``~``, or more than one ``/``);
    anything else is a Hugging Face hub id (``name`` or ``org/name``) and never read from the disk."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1


def _is_directory(value: str) -> bool:
    try:
        return Path(value).expanduser().is_dir()
    except (OSError, RuntimeError, ValueError):
        # A name too long for the filesystem, "~user" for an unknown user, a NUL byte: no directory.
        return False


class TransferSpec(TrainingOptions):
    """Overrides for the student stages; every unset field falls back to the strong model's."""


class CustomDatasetSpec(_Strict):
    """A dataset from a JSONL or CSV file."""

    path: str = Field(..., max_length=4096, description="JSONL or CSV file with a text and a label column")
    text: str = Field("text", max_length=200, description="column holding the text")
    label: str = Field("label", max_length=200, description="column holding the 0/1 label")
    test_path: str | None = Field(
        None, max_length=4096, description="separate test file; else a seeded hold-out of path"
    )
    format: Literal["jsonl", "csv"] | None = Field(None, description="inferred from the file suffix")

    @field_validator("text", "label")
    def _printable(cls, value: str, info: ValidationInfo) -> str:
        return check_name(value, str(info.field_name))


class DatasetSpec(_Strict):
    name: str | CustomDatasetSpec = Field(..., description="registry name, or a custom file")
    n_train: int | None = Field(
        None, ge=4, le=MAX_EXAMPLES, description="train examples, 4 to 10^8, split into halves A and B (all)"
    )
    n_test: int | None = Field(None, ge=2, le=MAX_EXAMPLES, description="test examples, 2 to 10^8 (all)")
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="draws the test sample (and the train sample when resample_per_seed is false)",
    )
    resample_per_seed: bool | None = Field(
        None,
        description="each seed draws its own train sample and halves, as the reference's seed does; "
        "false: every seed trains on the sample drawn with dataset.seed (true)",
    )
    sampling: Sampling | None = Field(
        None,
        description="random: a seeded random sample of the split | reference: its first rows and the "
        "reference's shuffle and halving (random)",
    )
    remove_overlap: bool | None = Field(
        None,
        description="remove half-B rows contained in a half-A row, and train rows containing a test "
        "row (true)",
    )
    max_dropped_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="refuse the job if truncation 'drop' would drop more than this share of a split (0.2)",
    )

    @field_validator("name")
    def _known_dataset(cls, value: str | CustomDatasetSpec) -> str | CustomDatasetSpec:
        from w2s.datasets import dataset_names

        if isinstance(value, str) and value not in dataset_names():
            raise ValueError(
                f"unknown dataset {value!r}; choose one of: {', '.join(dataset_names())}, "
                'or give a file: {"path": "data.jsonl", "text": "<column>", "label": "<column>"}'
            )
        return value


class LossSpec(_Strict):
    """A student loss and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_shorthand(cls, value: Any) -> Any:
        # Accept "xent" and {"name": "logconf", "aux_coef": 0.5} as well as the canonical form.
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "params" not in value:
            return {"name": value.get("name"), "params": {k: v for k, v in value.items() if k != "name"}}
        return value

    @model_validator(mode="after")
    def _buildable(self) -> LossSpec:
        from w2s.losses import build_loss

        build_loss(self.name, self.params)  # raises ValueError naming the loss or parameter
        return self

    @property
    def label(self) -> str:
        """The name results use: the loss name, plus its parameters when any are set."""
        if not self.params:
            return self.name
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({args})"


class JobSpec(_Strict):
    """A whole weak-to-strong experiment."""

    preset: Preset | None = Field(
        None, description="reference: the training defaults of openai/weak-to-strong (fields given win)"
    )
    dataset: DatasetSpec
    weak: ModelSpec
    strong: ModelSpec
    transfer: TransferSpec = Field(default_factory=TransferSpec)
    chain: list[ModelSpec] = Field(
        default_factory=list,
        max_length=MAX_CHAIN,
        description="bootstrapping: models between weak and strong, smallest first; each is trained on "
        "the previous one's labels (weak -> chain[0] -> ... -> strong), next to the direct weak -> "
        "strong student (none)",
    )
    # Each (seed, loss) is a training stage: the caps keep one request to at most 100 x 50 students.
    losses: list[LossSpec] = Field(
        default_factory=lambda: [LossSpec(name="xent")],
        min_length=1,
        max_length=MAX_LOSSES,
        description=f"1 to {MAX_LOSSES}",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS, description=f"1 to {MAX_SEEDS}"
    )
    ceiling_half: Literal["a", "b"] | None = Field(
        None,
        description="the half of the train set the strong ceilings learn on: b (default, and the "
        "reference preset's), as train_weak_to_strong.py and the paper, the half the students learn "
        "on, so ceiling and student see the same texts; a, as the reference's train_simple.py/sweep.py "
        "path, the weak supervisor's half",
    )

    @field_validator("chain", mode="before")
    @classmethod
    def _chain_shorthand(cls, value: Any) -> Any:
        # ["gpt2-medium", {"model": "gpt2-large", "lr": 1e-5}]: a bare string is a model id.
        if isinstance(value, list):
            return [{"model": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("seeds")
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(not 0 <= s <= MAX_SEED for s in value):
            raise ValueError(f"seeds must be distinct integers from 0 to {MAX_SEED}, e.g. [0, 1, 2]")
        return value

    @field_validator("losses")
    def _unique_losses(cls, value: list[LossSpec]) -> list[LossSpec]:
        labels = [loss.label for loss in value]
        if len(set(labels)) != len(labels):
            raise ValueError(f"losses are listed twice: {labels}; list each loss once")
        return value

    @model_validator(mode="after")
    def _losses_split_into_minibatches(self) -> JobSpec:
        # A loss computed from the whole batch (a quantile, a prior) must say so, or gradient
        # accumulation would silently change what it computes (see w2s.losses).
        from w2s.losses import build_loss, check_minibatch_invariance

        for student in (self.strong, *self.chain):
            batch_size, minibatch_size = _batch_sizes(self.student_options(student), self.preset)
            if minibatch_size >= batch_size:
                continue
            for index, loss in enumerate(self.losses):
                try:
                    check_minibatch_invariance(build_loss(loss.name, loss.params))
                except ValueError as error:
                    raise ValueError(
                        f"losses[{index}]: {error}; or set transfer.minibatch_size to batch_size "
                        f"({batch_size})"
                    ) from None
        return self

    def student_options(self, model: ModelSpec | None = None) -> ModelSpec:
        """A student's model (the strong one unless given) with the transfer overrides applied."""
        overrides = self.transfer.model_dump(exclude_none=True)
        return (model or self.strong).model_copy(update=overrides)

    def named_models(self) -> list[tuple[str, ModelSpec]]:
        """Every model of the job with the spec field that names it: weak, chain.0, ..., strong."""
        return [
            ("weak", self.weak),
            *((f"chain.{i}", model) for i, model in enumerate(self.chain)),
            ("strong", self.strong),
        ]

    def data_config(self) -> DataConfig:
        """The dataset options with every default resolved (the preset's, then the project's)."""
        return resolve_data(self.dataset, self.preset)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How the job's data is drawn and cleaned: every default resolved."""

    sampling: Sampling
    resample_per_seed: bool
    remove_overlap: bool
    max_dropped_fraction: float


def resolve_data(dataset: DatasetSpec, preset: Preset | None = None) -> DataConfig:
    defaults = REFERENCE_DATASET if preset == "reference" else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(dataset, name)
        return value if value is not None else defaults.get(name, default)

    return DataConfig(
        sampling=pick("sampling", "random"),
        resample_per_seed=pick("resample_per_seed", True),
        remove_overlap=pick("remove_overlap", True),
        max_dropped_fraction=pick("max_dropped_fraction", 0.2),
    )


def _batch_sizes(options: TrainingOptions, preset: Preset | None) -> tuple[int, int]:
    defaults = REFERENCE_TRAINING if preset == "reference" else {}
    batch_size = options.batch_size or defaults.get("batch_size", 32)
    return batch_size, min(options.minibatch_size or batch_size, batch_size)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Concrete hyperparameters of one run: every default resolved. Stage keys hash this."""

    mode: Mode
    lr: float
    epochs: float
    batch_size: int
    minibatch_size: int
    max_length: int
    optimizer: Optimizer
    lr_schedule: Schedule
    warmup_frac: float
    weight_decay: float
    dtype: DType
    gradient_checkpointing: bool
    lora_rank: int
    lora_alpha: float
    eval_every: int
    save_checkpoint: bool
    truncation: Truncation = "drop"
    train_dropout: bool = False
    head_bias: bool = True
    steps_rounding: StepsRounding = "up"
    batch_order: BatchOrder = "bucketed"
    holdout_frac: float = 0.0
    early_stopping_patience: int = 0  # 0: no early stopping (no hold-out)
    deterministic: bool = False


# Early stopping's defaults: a tenth of the training rows held out, three epochs of patience.
DEFAULT_HOLDOUT_FRAC, DEFAULT_PATIENCE = 0.1, 3


def resolve_training(
    options: TrainingOptions,
    preset: Preset | None = None,
    *,
    parameter_count: Callable[[], int | None] | None = None,
) -> TrainConfig:
    """Fill every unset option with its default: the preset's first, then this project's (some of
    which depend on the mode). ``parameter_count`` gives the model's size, which the reference preset
    needs to pick a learning rate; it is only called when that is the case."""
    reference = preset == "reference"
    defaults: dict[str, Any] = dict(REFERENCE_TRAINING) if reference else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(options, name)
        return value if value is not None else defaults.get(name, default)

    mode = options.mode or "full"
    lr = options.lr
    if lr is None and reference:
        parameters = parameter_count() if parameter_count is not None else None
        if parameters is None:
            raise ValueError(
                "preset 'reference' picks the learning rate by model size, but the size of "
                f"{getattr(options, 'model', 'the model')!r} is unknown; set lr explicitly"
            )
        lr = reference_lr(parameters)
    batch_size = pick("batch_size", 32)
    lora_rank = options.lora_rank or 8
    # Asking for patience implies a hold-out to watch; a hold-out implies stopping on it.
    patience_given = options.early_stopping_patience is not None
    holdout_frac = pick("holdout_frac", DEFAULT_HOLDOUT_FRAC if patience_given else 0.0)
    patience = pick("early_stopping_patience", DEFAULT_PATIENCE) if holdout_frac > 0 else 0
    return TrainConfig(
        mode=mode,
        lr=lr if lr is not None else MODE_DEFAULTS[mode]["lr"],
        epochs=pick("epochs", MODE_DEFAULTS[mode]["epochs"]),
        batch_size=batch_size,
        minibatch_size=min(options.minibatch_size or batch_size, batch_size),
        max_length=pick("max_length", 512),
        optimizer=pick("optimizer", "adam"),
        lr_schedule=pick("lr_schedule", "cosine"),
        warmup_frac=pick("warmup_frac", 0.05),
        weight_decay=pick("weight_decay", 0.0),
        dtype=options.dtype or "auto",
        gradient_checkpointing=bool(options.gradient_checkpointing),
        lora_rank=lora_rank,
        # The reference's LoRA: rank 8, alpha 8.
        lora_alpha=options.lora_alpha
        if options.lora_alpha is not None
        else float(lora_rank if reference else 2 * lora_rank),
        eval_every=options.eval_every or 0,
        save_checkpoint=bool(options.save_checkpoint),
        truncation=pick("truncation", "drop"),
        train_dropout=pick("train_dropout", False),
        head_bias=pick("head_bias", True),
        steps_rounding=pick("steps_rounding", "up"),
        batch_order=pick("batch_order", "bucketed"),
        holdout_frac=holdout_frac,
        early_stopping_patience=patience,
        deterministic=pick("deterministic", False),
    )


def chain_role(kind: str, position: int) -> str:
    """The role of an intermediate model of a chain: ``ceiling@2``, ``student@2`` for the model at
    ``position`` in weak (1) -> chain ... -> strong (k)."""
    return f"{kind}@{position}"


def resolved_models(spec: JobSpec) -> dict[str, tuple[ModelSpec, TrainConfig]]:
    """The model and concrete training config of each role: the weak supervisor, the strong ceiling
    and the strong students (the strong model with the transfer overrides), and for each model of a
    chain its ceiling and its students (``chain_role``)."""
    from w2s.memory import parameter_count

    models = {"weak": spec.weak, "ceiling": spec.strong, "student": spec.student_options()}
    for position, model in enumerate(spec.chain, start=2):
        models[chain_role("ceiling", position)] = model
        models[chain_role("student", position)] = spec.student_options(model)
    return {
        role: (
            model,
            resolve_training(model, spec.preset, parameter_count=lambda m=model: parameter_count(m)),
        )
        for role, model in models.items()
    }


class SpecError(ValueError):
    """A spec that failed validation; ``errors`` lists ``(field path, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("invalid spec:\n" + "\n".join(f"  {loc}: {msg}" for loc, msg in errors))


def validation_messages(error: ValidationError) -> list[tuple[str, str]]:
    """Turn pydantic's errors into ``(dotted.field, message)`` pairs a user can act on."""
    messages = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "spec"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = f"unknown field{_allowed_fields_hint(item['loc'])}"
        messages.append((loc, msg))
    return messages


def _allowed_fields_hint(loc: tuple[Any, ...]) -> str:
    # Walk the error location down the nested models to list the fields the user could have meant.
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
        elif part == CustomDatasetSpec.__name__:  # pydantic's tag for the matching union member
            model = CustomDatasetSpec
    return f"; allowed fields: {', '.join(model.model_fields)}"


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a spec dict; raise :class:`SpecError` naming every bad field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(validation_messages(error)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a JSON or YAML spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([("spec", f"file {str(path)!r} not found")])
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SpecError([("spec", f"{path} is not valid JSON/YAML: {error}")]) from None
    if not isinstance(data, dict):
        raise SpecError([("spec", f"{path} must hold a mapping with dataset, weak, strong, ...")])
    return parse_spec(data)
