"""The ``README.md`` model card of a pushed delta: YAML metadata + a short "how to use".

Rendered only from the Hub manifest (``deltahub.json``), the repo id and the Hub endpoint the repo
is pushed to (``HF_ENDPOINT``: the base link points there), so the same delta pushed to the same
Hub always gives the same bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

LIBRARY_NAME = "deltahub"
DEFAULT_ENDPOINT = "https://huggingface.co"
BASE_TAGS = ("deltahub", "bitdelta", "1-bit-delta")


def _yaml_str(value: str) -> str:
    """A YAML scalar (JSON strings are valid YAML flow scalars)."""
    return json.dumps(value, ensure_ascii=True)


def card_tags(hub_manifest: dict[str, Any]) -> list[str]:
    tags = list(BASE_TAGS)
    model_type = hub_manifest["model"].get("model_type")
    if model_type and model_type not in tags:
        tags.append(model_type)
    return tags


def render_card(
    repo_id: str, hub_manifest: dict[str, Any], local_name: str | None = None, endpoint: str = DEFAULT_ENDPOINT
) -> str:
    """The card's text; the base repo is linked on ``endpoint`` (the Hub the delta is pushed to)."""
    base = hub_manifest["base"]
    hub = base.get("hub") or {}
    base_repo = hub.get("repo_id")
    base_rev = hub.get("revision")
    lines = ["---"]
    if base_repo:
        lines.append(f"base_model: {_yaml_str(base_repo)}")
    lines.append(f"library_name: {LIBRARY_NAME}")
    lines.append("tags:")
    lines += [f"- {_yaml_str(t)}" for t in card_tags(hub_manifest)]
    lines.append("---")
    lines.append("")

    title = repo_id.rsplit("/", 1)[-1]
    codecs = Counter(spec["codec"] for spec in hub_manifest["tensors"].values())
    arch = ", ".join(hub_manifest["model"].get("architectures") or []) or "unknown architecture"
    if base_repo:
        base_text = f"[`{base_repo}`]({endpoint.rstrip('/')}/{base_repo})"
        base_text += f" at revision `{base_rev}`" if base_rev else " (revision not pinned)"
    else:
        base_text = "a base model not published on the Hub"
    name = local_name or title
    lines += [
        f"# {title}",
        "",
        f"A fine-tune of {base_text}, stored as a 1-bit [BitDelta](https://arxiv.org/abs/2402.10193) "
        f"delta by [deltahub](https://github.com/deltahub/deltahub): {arch}, "
        f"{hub_manifest['model']['dtype']}; tensors: "
        + ", ".join(f"{n} {c}" for c, n in sorted(codecs.items()))
        + ".",
        "",
        "This repo holds only the delta (packed sign bits, per-matrix scales, the tensors stored "
        "dense) and the fine-tune's config and tokenizer files; the base weights come from the base "
        "repo. `deltahub.json` describes every tensor and pins the base's tensor hashes, so a delta "
        "is only ever applied to the exact base it was made from.",
        "",
        "## How to use",
        "",
        "```bash",
        "pip install deltahub",
        f"deltahub pull {repo_id} --name {name}        # fetches the base too, if missing",
        f"deltahub materialize {name} ./{name} --dtype bfloat16   # an ordinary HF checkpoint",
        "```",
        "",
        "```python",
        "import deltahub",
        "",
        f'model = deltahub.load_model("{name}")          # a transformers model, no checkpoint written',
        f'tokenizer = deltahub.load_tokenizer("{name}")',
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["BASE_TAGS", "DEFAULT_ENDPOINT", "LIBRARY_NAME", "card_tags", "render_card"]
