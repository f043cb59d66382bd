"""Serving: the step-level batching engine (:mod:`.engine`) and the OpenAI-compatible server."""
