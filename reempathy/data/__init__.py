"""Records: the dialogue schema, reading and checking JSONL data sets, and the prompt/reference rule.

Every command that reads dialogues (``train``, ``run``, ``reflect-data``, ``pairs``, ``eval-check``)
reads them through this package, so what is trained is what is run.
"""
