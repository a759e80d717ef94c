"""deltahub inside other serving engines: vLLM (:mod:`deltahub.integrations.vllm`, a plug-in loaded
through vLLM's ``vllm.general_plugins`` entry point) and Ray Serve (:mod:`deltahub.integrations.ray`).

These modules import their engine; nothing else of deltahub imports them (the engine loads them).
"""
