"""A pool of checkpoints larger than memory: merged by streaming tensor by tensor, never loaded whole."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from mergelab.config_types import Range
from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS
from mergelab.engine.streaming import VOCAB_POLICIES, plan_tensors, stream_merge
from mergelab.io.files import DTYPE_NAMES, CheckpointReader, is_adapter_dir, resolve_model_dir
from mergelab.io.reader import open_checkpoint
from mergelab.methods.base import TaskVectorMethod
from mergelab.pools.base import ModelPool, PoolSources

#: Files that hold a tokenizer's vocabulary (one of them must be in the pretrained dir for a suite to score a merge).
TOKENIZER_FILES = (
    *("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model"),
)


def read_config(model_dir: Path, where: str) -> dict[str, Any] | None:
    """A model dir's config.json as a dict; None if it has none. Unreadable JSON raises naming ``where``."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model pool: {where}: {path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model pool: {where}: {path} is not a JSON object")
    return cfg


def check_dtypes(base: CheckpointReader, experts: Sequence[CheckpointReader], paths: Mapping[str, str]) -> None:
    """Refuse an expert tensor whose dtype is not of the pretrained's kind (floating point or not).

    Float widths may differ (a bf16 base with fp32 experts): blocks are converted to the compute dtype when read
    and the result has the pretrained's dtype. A float tensor stored as integers (a quantized expert) would be
    merged as if its codes were weights. ``paths``: expert name -> path, for the message.
    """
    for name in base:
        want = base.dtype(name)
        for e in experts:
            got = e.dtype(name)
            if got.is_floating_point != want.is_floating_point:
                raise ValueError(
                    f"model pool: expert '{e.name}' ({paths.get(e.name, e.dir)}): tensor '{name}' has dtype "
                    f"{DTYPE_NAMES[got]}, the pretrained model's has {DTYPE_NAMES[want]}"
                )


class CheckpointPool(ModelPool):
    """A pool of large checkpoints (hub ids or local dirs) merged by streaming, never loaded whole.

    Each checkpoint is safetensors or PyTorch ``.bin`` files (one shard in memory at a time); an expert may also be
    a PEFT LoRA adapter, read as the pretrained checkpoint plus its task vector, row block by row block
    (:func:`mergelab.io.reader.open_checkpoint`).

    Capabilities: not ``in_memory`` (weights are read from the files row block by row block), not ``scorable``
    (a merge is written to disk by :meth:`write_merged` and scored from there by a suite that evaluates
    checkpoints, e.g. lm-eval's), no ``needs_suite`` (``eval=none`` merges only), no ``multi_process`` (the merge is
    disk-bound and runs in one process; AWD fits one tensor at a time). Only task-vector methods merge it.

    Args:
        pretrained: the pretrained model.
        experts: expert name -> hub id or local dir (the names label the coefficients in reports).
        include / exclude: regexes over tensor names selecting what is merged (the rest stays pretrained);
            default: every floating-point tensor, embeddings and lm_head included (as MetaGPT
            re-implementations do).
        vocab: ``extend`` | ``base`` | ``error`` for experts with extra embedding rows (see :func:`stream_merge`).
        max_shard_bytes: output shard size.
        chunk_elems: elements per row block and task in memory.
        trust_remote_code: passed to transformers when a suite loads the merged checkpoint to score it.
    """

    kind = "checkpoint pool"
    in_memory = False
    scorable = False
    needs_suite = False
    multi_process = False

    def __init__(
        self,
        pretrained: str,
        experts: Mapping[str, str],
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        vocab: str = "extend",
        max_shard_bytes: Annotated[int, Range(low=1)] = 2**30,
        chunk_elems: Annotated[int, Range(low=1)] = DEFAULT_CHUNK_ELEMS,
        trust_remote_code: bool = False,
    ) -> None:
        if not experts:
            raise ValueError("model.experts is empty: a checkpoint pool needs at least one expert")
        if vocab not in VOCAB_POLICIES:
            raise ValueError(f"model.vocab must be one of {VOCAB_POLICIES}, got {vocab!r}")
        super().__init__({k: str(v) for k, v in experts.items()}, exclude, trust_remote_code=trust_remote_code)
        try:
            self.include = [re.compile(p) for p in include]
        except re.error as e:
            raise ValueError(f"model.include: invalid regex: {e}") from e
        self.pretrained, self.experts = str(pretrained), {k: str(v) for k, v in experts.items()}
        self.vocab = vocab
        self.max_shard_bytes, self.chunk_elems = int(max_shard_bytes), int(chunk_elems)
        # Known from the config alone: methods may read them before setup (AWD's fit names its tensors by task).
        self.tasks = list(self.experts)
        self.resolved = dict(self.experts)
        self.expert_of = {t: t for t in self.tasks}
        self.suite: Any = None
        self._checked_for: tuple[Any] | None = None  # (suite,) once check_inputs passed for it

    def setup(self, suite: Any, trainer_kwargs: Mapping[str, Any]) -> None:
        """Check the checkpoints fit together (headers only) and, with a suite, that it can score a checkpoint dir.

        ``suite=None``: merge only. With a suite, :attr:`expert_of` matches each suite task with the expert the
        suite names for it (``eval.experts``, default: the expert of its own name) where the pool has that expert,
        for the record only: the experts are not scored here.
        """
        if self._checked_for is None or self._checked_for[0] is not suite:  # the run checks before its loggers start
            self.check_inputs(suite)
        if suite is not None:
            matched = dict(getattr(suite, "experts", None) or {})
            self.expert_of = {t: matched.get(t, t) for t in suite.task_names if matched.get(t, t) in self.experts}
        self.suite = suite

    def check_inputs(self, suite: Any) -> None:
        """A suite that cannot score a checkpoint dir, unreadable or mismatched checkpoints, a selection that merges
        nothing, and a pretrained dir without the tokenizer a suite needs fail here, from headers and configs,
        before any work."""
        if suite is not None and not callable(getattr(suite, "evaluate_checkpoint", None)):
            raise ValueError(
                f"{self.describe()} is merged to disk, then scored from there by a suite that evaluates "
                f"checkpoints (eval=lm_harness); eval '{suite.name}' cannot: set eval=none or eval=lm_harness"
            )
        with self.tensor_sources():
            pass
        if suite is not None:
            self.check_tokenizer(suite.name)
        self._checked_for = (suite,)

    def check_tokenizer(self, suite: str) -> None:
        """Refuse a pretrained dir without a tokenizer transformers can load before merging: the merged checkpoint
        copies the pretrained's tokenizer files, and the suite scores it with them."""
        from transformers import AutoTokenizer

        base_dir = self._resolve("pretrained model", self.pretrained)
        try:
            if not any((base_dir / f).is_file() for f in TOKENIZER_FILES):
                # transformers would build an empty tokenizer from config.json alone (a vocabulary of its specials)
                raise FileNotFoundError(f"none of {list(TOKENIZER_FILES)}")
            AutoTokenizer.from_pretrained(base_dir, trust_remote_code=self.trust_remote_code)
        except Exception as e:
            reason = " ".join(str(e).split())[:200]
            raise ValueError(
                f"eval={suite} scores the merged checkpoint with the tokenizer copied from the pretrained model dir "
                f"{base_dir}, which has none that transformers can load ({type(e).__name__}: {reason}); add its "
                "tokenizer files (tokenizer.json, tokenizer_config.json, ...) to that dir"
            ) from None

    def check_method(self, method: Any, where: str) -> None:
        """Only task-vector methods stream (their merge is computed row block by row block)."""
        super().check_method(method, where)
        if not isinstance(method, TaskVectorMethod):
            raise ValueError(f"{where} cannot stream: it is not a task-vector method ({self.describe()})")

    @contextmanager
    def tensor_sources(self) -> Iterator[PoolSources]:
        """The checkpoints, opened lazily (row blocks are read on demand) and closed afterwards."""
        base, experts, merged = self.open_checkpoints()
        try:
            yield PoolSources(base, list(experts), merged, str(self.pretrained))
        finally:
            for ck in (base, *experts):
                ck.close()

    def open_checkpoints(self) -> tuple[CheckpointReader, list[CheckpointReader], list[str]]:
        """The pretrained checkpoint, the experts (opened lazily; the caller closes them) and the merged tensors.

        Checks first that the checkpoints are one architecture (:meth:`check_configs`), then, from the headers,
        that every expert has every pretrained tensor with its shape (or extra rows, per ``vocab``) and a dtype of
        the same kind (:func:`check_dtypes`). An adapter expert is mapped onto the pretrained tensors here.
        """
        base_dir, expert_dirs = self.check_configs()
        base = open_checkpoint(base_dir, name="pretrained")
        experts: list[CheckpointReader] = []
        try:
            for t in self.experts:
                experts.append(open_checkpoint(expert_dirs[t], name=t, base=base, pretrained=self.pretrained))
            merged, _ = plan_tensors(base, experts, self.include_patterns, self.exclude_patterns, self.vocab)
            check_dtypes(base, experts, self.experts)
        except BaseException:
            for ck in (base, *experts):
                ck.close()
            raise
        return base, experts, merged

    def check_configs(self) -> tuple[Path, dict[str, Path]]:
        """The pretrained's and the experts' dirs (hub ids downloaded), once their config.json files agree.

        The pretrained model needs a config.json: the merged checkpoint copies it, and without one transformers
        cannot load the result. Each expert needs one too, with the pretrained's ``model_type`` and (where both
        list them) ``architectures``: tensor names alone do not tell architectures apart (a Mistral checkpoint has
        a Llama's names and shapes), and merging two architectures gives a model of neither. So an expert without
        config.json is refused rather than trusted (copy the pretrained's config.json beside it if it truly is a
        fine-tune of it). A PEFT adapter has no config.json of its own: the pool's pretrained model is its base, so it
        is the pretrained's architecture by construction. Raises a one-line error naming the expert, its path and
        both values.
        """
        base_dir = self._resolve("pretrained model", self.pretrained)
        base_cfg = read_config(base_dir, f"pretrained model ({self.pretrained})")
        if base_cfg is None:
            raise FileNotFoundError(
                f"model pool: pretrained model dir '{base_dir}' has no config.json (not a HF model dir); the merged "
                "checkpoint copies it, so transformers could not load the result"
            )
        dirs = {}
        for task, path in self.experts.items():
            where = f"expert '{task}' ({path})"
            dirs[task] = self._resolve(f"expert '{task}'", path)
            if is_adapter_dir(dirs[task]):
                continue
            cfg = read_config(dirs[task], where)
            if cfg is None:
                raise FileNotFoundError(
                    f"model pool: {where} has no config.json in {dirs[task]}, so its architecture cannot be checked "
                    f"against the pretrained model's ('{base_cfg.get('model_type')}'); add the pretrained's "
                    "config.json if it is a fine-tune of it"
                )
            for field in ("model_type", "architectures"):
                mine, theirs = cfg.get(field), base_cfg.get(field)
                if field == "architectures" and (mine is None or theirs is None):
                    continue  # optional in configs: model_type alone decides then
                if mine != theirs:
                    raise ValueError(
                        f"model pool: {where}: architecture ({field}) {mine!r} differs from the pretrained model's "
                        f"{theirs!r} ({self.pretrained})"
                    )
        return base_dir, dirs

    @staticmethod
    def _resolve(what: str, path: str) -> Path:
        """:func:`resolve_model_dir`, its errors naming the pool entry."""
        try:
            return resolve_model_dir(path)
        except OSError as e:
            raise type(e)(f"model pool: {what}: {e}") from None

    @property
    def include_patterns(self) -> list[str]:
        return [p.pattern for p in self.include]

    @property
    def exclude_patterns(self) -> list[str]:
        return [p.pattern for p in self.exclude]

    def write_merged(self, method: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Stream-merge the pool with ``method`` (a task-vector method) into ``out_dir``.

        The checkpoints are checked as by :meth:`setup` first (headers and configs only), so a pool used without
        :meth:`setup` still refuses another architecture, a missing config.json or a dtype of the wrong kind.
        """
        self.check_method(method, f"method {type(method).__name__}")
        with self.tensor_sources():
            pass
        return stream_merge(
            method,
            self.pretrained,
            list(self.experts.values()),
            out_dir,
            include=self.include_patterns,
            exclude=self.exclude_patterns,
            vocab=self.vocab,
            max_shard_bytes=self.max_shard_bytes,
            chunk_elems=self.chunk_elems,
            overwrite=overwrite,
            task_names=list(self.experts),
        )
