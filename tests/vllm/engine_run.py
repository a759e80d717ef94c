"""Run vLLM engines in this process, one after another, and print their greedy tokens as JSON.

    python engine_run.py SPEC.json   ->  stdout: {"runs": [[tokens of prompt 1, ...], ...]}

SPEC: {"runs": [{"model": DIR, "prompts": [text, ...], "max_tokens": N,
                 "engine": {extra LLM(...) kwargs}, "loras": [null | [name, id, path], ...],
                 "batches": [{"prompts": [...], "loras": [...]}, ...] (instead of prompts/loras),
                 "inspect": bool, "fake_vllm_version": "0.31.0"}]}
Each run reports "tokens", "cached" (num_cached_tokens per request) and "errors" (per batch when
"batches" is given); an engine that fails to start reports {"error": ...}.

The tests run engines in a child process: vLLM's distributed state is per process, and the layer
tests of test_vllm_plugin.py set up their own.
"""

from __future__ import annotations

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(open(sys.argv[1]).read())
    results = []
    for run in spec["runs"]:
        engine = {"enforce_eager": True, "gpu_memory_utilization": 0.1, "dtype": "float32", "max_model_len": 256,
                  "load_format": "deltahub", **run.get("engine", {})}
        import vllm

        real_version = vllm.__version__
        if run.get("fake_vllm_version"):  # what deltahub's plug-in sees as the installed vLLM
            vllm.__version__ = run["fake_vllm_version"]
        try:
            llm = LLM(run["model"], **engine)
        except Exception as exc:  # noqa: BLE001 (reported to the test)
            results.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        finally:
            vllm.__version__ = real_version
        params = SamplingParams(max_tokens=run["max_tokens"], temperature=0, ignore_eos=True)
        batches = run.get("batches") or [{"prompts": run["prompts"], "loras": run.get("loras")}]
        tokens, cached, errors = [], [], []
        for batch in batches:
            kwargs = {}
            if batch.get("loras"):
                from vllm.lora.request import LoRARequest

                kwargs["lora_request"] = [None if lo is None else LoRARequest(*lo) for lo in batch["loras"]]
            try:
                outs = llm.generate(batch["prompts"], params, **kwargs)
            except Exception as exc:  # noqa: BLE001 (reported to the test)
                errors.append(f"{type(exc).__name__}: {exc}")
                tokens.append(None)
                cached.append(None)
                continue
            errors.append(None)
            tokens.append([list(o.outputs[0].token_ids) for o in outs])
            cached.append([o.num_cached_tokens for o in outs])
        if not run.get("batches"):
            tokens, cached, errors = tokens[0], cached[0], errors[0]
        if run.get("inspect"):
            from deltahub.integrations.vllm.loader import delta_modules

            def inspect(model):
                mods = delta_modules(model)
                return {"delta_layers": len(mods), "merged": sum(int(m.delta_merged) for m in mods.values()),
                        "nonzero_scales": sum(int(m.delta_scales.numel() > 0 and m.delta_scales.abs().sum() > 0)
                                              for m in mods.values())}

            results.append({"tokens": tokens, "cached": cached, "errors": errors, "inspect": llm.apply_model(inspect)[0]})
        else:
            results.append({"tokens": tokens, "cached": cached, "errors": errors})
        del llm
        gc.collect()
    print(json.dumps({"runs": results}))


if __name__ == "__main__":
    main()
