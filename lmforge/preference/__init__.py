"""Synthetic preference data with an LLM judge (seed 002's recipe, as a reusable tool).

``generate`` (questions -> candidates -> scores -> pairs), ``evaluate`` (Q&A accuracy,
compression and win rates with intervals, charted) and ``iterate`` (rounds of generate -> DPO
job -> evaluate), each resumable from its run directory. The judge and the policy are any
OpenAI-compatible endpoints; ``rules.py`` holds the pairing rule and the statistics, pure.
"""
