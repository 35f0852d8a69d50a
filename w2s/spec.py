"""The job spec: what a weak-to-strong experiment is, as a validated pydantic v2 model.

The spec is user input and keeps ``None`` for "use the default"; :func:`resolve_training` turns a
model's options into a concrete :class:`TrainConfig`, which is what stage keys hash. Keeping the two
apart lets the student stages inherit the strong model's *explicit* choices without inheriting
defaults that depend on a mode the transfer overrides.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Mode = Literal["full", "probe", "lora"]
Optimizer = Literal["adam", "adafactor"]
Schedule = Literal["cosine", "constant"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Pooling = Literal["auto", "last", "mean"]

# Upper bounds on sizes a request can ask for: far above any real experiment, low enough that a typo
# (or a fuzzer) cannot ask the service for a billion stages or overflow a 32-bit database column.
MAX_SEED = 2**31 - 1
MAX_EXAMPLES = 100_000_000

# Defaults that depend on the training mode: a linear probe on frozen features wants a much larger
# learning rate and more passes than fine-tuning the whole network.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"lr": 5e-5, "epochs": 2},
    "lora": {"lr": 2e-4, "epochs": 2},
    "probe": {"lr": 1e-3, "epochs": 30},
}


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
        None, ge=8, le=32768, description="truncate texts to this many tokens (512)"
    )
    optimizer: Optimizer | None = Field(None, description="adam (AdamW) | adafactor (default adam)")
    lr_schedule: Schedule | None = Field(None, description="cosine | constant, after warmup (cosine)")
    warmup_frac: float | None = Field(None, ge=0, le=1, description="fraction of steps warming up (0.05)")
    weight_decay: float | None = Field(None, ge=0, le=1, description="AdamW weight decay (0.0)")
    dtype: DType | None = Field(
        None, description="auto (bf16 autocast where the hardware supports it) | float32 | bfloat16 | float16"
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

    @model_validator(mode="after")
    def _minibatch_divides_batch(self) -> TrainingOptions:
        if self.batch_size and self.minibatch_size and self.batch_size % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size}); "
                "gradient accumulation runs batch_size / minibatch_size forward passes per step"
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

    @field_validator("model")
    def _model_looks_like_a_model(cls, value: str) -> str:
        looks_like_path = value.startswith((".", "/", "~")) or value.count("/") > 1
        if looks_like_path and not _is_directory(value):
            raise ValueError(
                f"local model directory {value!r} does not exist; give an existing directory "
                "or a Hugging Face hub id such as 'gpt2'"
            )
        return value


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


class DatasetSpec(_Strict):
    name: str | CustomDatasetSpec = Field(..., description="registry name, or a custom file")
    n_train: int | None = Field(
        None, ge=4, le=MAX_EXAMPLES, description="train examples, 4 to 10^8, split into halves A and B (all)"
    )
    n_test: int | None = Field(None, ge=2, le=MAX_EXAMPLES, description="test examples, 2 to 10^8 (all)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed for sampling, splitting and formatting")

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

    dataset: DatasetSpec
    weak: ModelSpec
    strong: ModelSpec
    transfer: TransferSpec = Field(default_factory=TransferSpec)
    # Each (seed, loss) is a training stage: the caps keep one request to at most 100 x 50 students.
    losses: list[LossSpec] = Field(
        default_factory=lambda: [LossSpec(name="xent")], min_length=1, max_length=50, description="1 to 50"
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, max_length=100, description="1 to 100"
    )

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

    def student_options(self) -> ModelSpec:
        """The strong model with the transfer overrides applied."""
        overrides = self.transfer.model_dump(exclude_none=True)
        return self.strong.model_copy(update=overrides)


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


def resolve_training(options: TrainingOptions) -> TrainConfig:
    """Fill every unset option with its default (some defaults depend on the mode)."""
    mode = options.mode or "full"
    batch_size = options.batch_size or 32
    lora_rank = options.lora_rank or 8
    return TrainConfig(
        mode=mode,
        lr=options.lr if options.lr is not None else MODE_DEFAULTS[mode]["lr"],
        epochs=options.epochs if options.epochs is not None else MODE_DEFAULTS[mode]["epochs"],
        batch_size=batch_size,
        minibatch_size=min(options.minibatch_size or batch_size, batch_size),
        max_length=options.max_length or 512,
        optimizer=options.optimizer or "adam",
        lr_schedule=options.lr_schedule or "cosine",
        warmup_frac=options.warmup_frac if options.warmup_frac is not None else 0.05,
        weight_decay=options.weight_decay if options.weight_decay is not None else 0.0,
        dtype=options.dtype or "auto",
        gradient_checkpointing=bool(options.gradient_checkpointing),
        lora_rank=lora_rank,
        lora_alpha=options.lora_alpha if options.lora_alpha is not None else 2.0 * lora_rank,
        eval_every=options.eval_every or 0,
        save_checkpoint=bool(options.save_checkpoint),
    )


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
