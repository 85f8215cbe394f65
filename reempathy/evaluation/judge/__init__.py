"""``llm-judge``: rubric (``rubric``), reply parsing (``parsing``), back ends (``backends``), the evaluator and A/B (``evaluator``)."""
