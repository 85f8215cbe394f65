"""Speech in and speech out for GLM-4-Voice, ported natively (no checkpoint code is run). See docs/speech.md.

- ``reempathy.speech.tokenizer``: ``load_speech_tokenizer(dir)``: WAV → units (12.5 per second)
- ``reempathy.speech.decoder``: ``load_speech_decoder(dir)``: units → 22.05 kHz waveform; streaming synthesis
- ``reempathy.streaming``: ``run_spoken_turn`` / ``stream_spoken_turn``: a whole spoken turn
- ``reempathy.speech.audio``: WAV reading with one-line input errors, atomic WAV writing
- ``reempathy.speech.cli``: ``reempathy speech tokenize | synthesize | convert-decoder``
- ``reempathy.speech.tiny``: tiny random-weight directories in the published formats (tests, demos)
"""
