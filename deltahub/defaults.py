"""Every user-facing default of deltahub, in one place.

The library (``deltahub.ops``, :mod:`deltahub.api`) takes its defaults from here, and the command
line shows them (``--help``) from here through :mod:`deltahub.api`: a default is written once.

Pure constants: this module imports nothing (no torch), so the CLI can read it at start-up.
Dtypes are named by their torch attribute names (``"float32"``); the library turns them into
``torch.dtype`` where it needs one.
"""

from __future__ import annotations

# -------------------------------------------------------------------------------------- compress
#: The codec of 2-D weight matrices (``deltahub compress --codec``).
DEFAULT_CODEC = "sign1"
#: The codec `--bits`, `--scales` and `--group-size` configure (progressive sign planes).
PLANES_CODEC = "planes"
#: The codec `--lossless` selects (the exact fine-tune, XOR with the base, bytes split for zstd).
LOSSLESS_CODEC = "lossless"
SCALE_GRANULARITIES = ("matrix", "row", "group")
#: How embeddings and the LM head are stored: ``sign1`` (1-bit delta with the matrix codec),
#: ``rowsparse`` (changed rows as signs + a scale per row, unchanged rows free, added tokens dense)
#: or ``dense`` (the fine-tune's). Measured on SmolLM2-135M + a 200-step Shakespeare fine-tune
#: (docs/design.md, bench/embeddings.py): sign1 keeps 73% of the gain at 15.3x smaller, rowsparse 96%
#: at 15.1x (every row changed), dense 93% at 2.3x. sign1 stays the default until calibration can
#: train rowsparse's per-row scales (flipping also makes default deltas v2 manifests): see design.md.
DEFAULT_EMBEDDINGS = "sign1"
EMBEDDINGS_MODES = ("sign1", "rowsparse", "dense")

# -------------------------------------------------------------------------------------- checkpoints
#: Largest safetensors file written by ``materialize`` and ``push`` (as ``save_pretrained``).
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # DEFAULT_MAX_SHARD_SIZE in bytes (a test keeps them equal)
#: The dtypes a model may be materialized, loaded or run in (``None``: each tensor keeps its own).
DTYPE_CHOICES = ("float16", "bfloat16", "float32")

# -------------------------------------------------------------------------------------- running models
#: Torch device of ``load_model``, ``generate``, ``calibrate`` and ``eval``.
DEFAULT_DEVICE = "cpu"
#: ``load_model`` builds every tensor in full (``materialize``) or keeps the deltas packed (``delta``).
LOAD_MODES = ("materialize", "delta")
DEFAULT_LOAD_MODE = "materialize"
#: Tokens ``generate`` produces per prompt.
DEFAULT_MAX_NEW_TOKENS = 32

# -------------------------------------------------------------------------------------- serving
#: ``deltahub serve``: the address it binds (loopback unless told otherwise) and its port.
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
#: ``deltahub serve --device``: ``auto`` is CUDA (with the Triton kernels) when available, else the CPU.
SERVE_DEVICE = "auto"
#: Most requests decoded together per base (each holds its own KV cache).
SERVE_MAX_BATCH = 8
#: Requests admitted beyond those decoding (waiting for a row or a load); more get 429.
SERVE_MAX_WAITING = 64
#: Seconds a client is told to wait after a 429 (``Retry-After``).
SERVE_RETRY_AFTER = 1
#: Seconds a request waits for a model in use to be released when the memory budget is full (then 503).
SERVE_FULL_WAIT_S = 10.0
#: Seconds SIGTERM leaves requests in flight to finish before they are cancelled.
SERVE_GRACE_SECONDS = 30.0
SERVE_MAX_GRACE_SECONDS = 86400.0  # a day: longer is a mistake (and overflows timers)
#: ``deltahub serve --engine``: deltahub's own server, or vLLM's with deltahub's plug-in.
SERVE_ENGINES = ("builtin", "vllm")
SERVE_ENGINE = "builtin"
#: ``vllm-prepare --adapter-planes``: sign planes an adapter slot holds (sign1 and one-plane deltas).
VLLM_ADAPTER_PLANES = 1
#: ``vllm-prepare --apply``: how a Linear applies its delta in vLLM (see integrations/vllm/quant.py).
VLLM_APPLY_MODES = ("auto", "merged", "on-the-fly")
VLLM_APPLY = "auto"
#: A model whose config names no context length.
SERVE_DEFAULT_CONTEXT = 2048
#: ``max_tokens`` when a request gives none: completions (OpenAI's default) and chat (capped by the context).
SERVE_COMPLETION_MAX_TOKENS = 16
SERVE_CHAT_MAX_TOKENS = 512

# -------------------------------------------------------------------------------------- calibration
CALIB_SAMPLES = 64  # token sequences
CALIB_SEQ_LEN = 128  # tokens per sequence
CALIB_STEPS = 100  # optimizer steps
CALIB_LR = 0.01  # Adam learning rate, relative to each scale
CALIB_BATCH_SIZE = 4  # sequences per step
CALIB_SEED = 0  # sample choice and batch order
BUDGET_ROLE_SAMPLES = 16  # calibration sequences on which a budget measures each role's KL at 1, 2, ... planes
#: Teacher logits kept per token (the top k; the rest of the distribution as one bucket).
DEFAULT_TOP_K = 128
#: The dtype teacher and student run in (fp32: the CPU's fast and exact choice).
COMPUTE_DTYPE = "float32"

# -------------------------------------------------------------------------------------- evaluation
EVAL_SAMPLES = 64
EVAL_SEQ_LEN = 128
EVAL_BATCH_SIZE = 4

# -------------------------------------------------------------------------------------- store
#: Space a store keeps allocated for a full disk (``$DELTAHUB_HOME/reserve``; ``DELTAHUB_RESERVE_BYTES``).
DEFAULT_RESERVE_BYTES = 4 << 20

# -------------------------------------------------------------------------------------- Hub
#: The branch ``push`` commits to and ``pull``/``add`` read when no revision is given.
DEFAULT_REVISION = "main"
