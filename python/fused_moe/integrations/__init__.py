"""Adapters that plug fused_moe into other libraries; import the one you use
(``fused_moe.integrations.transformers``)."""
