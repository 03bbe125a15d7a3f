"""The flows: training, sampling/evaluation and the checkpoint tools, over the checkpoint library's public API.

Flows report what they do as events (:mod:`.events`) and never print; the CLI renders them.
"""
