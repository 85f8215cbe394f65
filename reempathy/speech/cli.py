"""``reempathy speech tokenize | synthesize | convert-decoder``: the speech tokenizer and decoder on their own.

Wire into the main parser with ``add_speech_parser(subparsers)``; errors are ``ReempathyError``s,
which the main command prints on one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from reempathy.options import seed_arg


def cmd_tokenize(args: argparse.Namespace) -> int:
    import torch

    from reempathy.speech.audio import load_speech
    from reempathy.speech.tokenizer import load_speech_tokenizer

    tokenizer = load_speech_tokenizer(args.tokenizer, device=args.device)
    rows = []
    for path in args.files:
        audio = load_speech(path, tokenizer.max_seconds)
        units = tokenizer.units(torch.from_numpy(audio.samples[0]), audio.sample_rate)
        rows.append({"path": path, "seconds": round(audio.seconds, 3), "units": units})
        if not args.json:  # one line per file as soon as it is done
            print(f"{path}\t{' '.join(map(str, units))}", flush=True)
    if args.json:
        json.dump(
            {"tokenizer": args.tokenizer, "units_per_second": tokenizer.units_per_second, "files": rows},
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    import numpy as np

    from reempathy.speech.units import read_units
    from reempathy.safe_write import check_not_input, check_output_file, write_bytes
    from reempathy.speech.audio import write_wav
    from reempathy.speech.decoder import load_speech_decoder

    units = read_units(args.units)
    check_output_file(args.out, "--out")  # every output is checked before the synthesis work
    check_not_input(args.out, "--out", [("--units", args.units)])
    if args.save_mel:
        check_output_file(args.save_mel, "--save-mel")
        check_not_input(args.save_mel, "--save-mel", [("--units", args.units), ("--out", args.out)])
    decoder = load_speech_decoder(args.decoder, device=args.device)
    out = decoder.synthesize_full(units, seed=args.seed)
    write_wav(args.out, out.waveform, decoder.sample_rate, float32=args.float)
    if args.save_mel:
        import io

        buf = io.BytesIO()
        np.save(buf, out.mel.cpu().numpy())
        write_bytes(args.save_mel, buf.getvalue(), "--save-mel")
    seconds = out.waveform.shape[-1] / decoder.sample_rate
    print(
        f"wrote {args.out}: {len(units)} units, {seconds:.2f} s at {decoder.sample_rate} Hz, "
        f"{'32-bit float' if args.float else '16-bit PCM'}, seed {args.seed}"
    )
    return 0


def cmd_convert_decoder(args: argparse.Namespace) -> int:
    from reempathy.speech.decoder import convert_decoder_weights

    for path in convert_decoder_weights(args.decoder, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


def add_speech_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``speech`` with its ``tokenize`` and ``synthesize`` commands to the main parser's subparsers."""
    speech = subparsers.add_parser(
        "speech", help="GLM-4-Voice speech tokenizer (WAV → units) and decoder (units → WAV)"
    )
    sub = speech.add_subparsers(dest="speech_command", required=True)

    p = sub.add_parser("tokenize", help="print the unit ids of WAV files (12.5 per second)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="glm-4-voice-tokenizer directory")
    p.add_argument("files", nargs="+", metavar="FILE", help="WAV files (first channel is used; any sample rate)")
    p.add_argument("--json", action="store_true", help="print JSON: units per file")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("synthesize", help="turn unit ids into a 22.05 kHz WAV file")
    p.add_argument("--decoder", required=True, metavar="DIR", help="glm-4-voice-decoder directory")
    p.add_argument("--units", required=True, metavar="FILE", help="unit ids: JSON list, <|audio_N|> tokens or integers")
    p.add_argument("--out", required=True, metavar="OUT.wav", help="WAV file to write (replaced atomically)")
    p.add_argument("--seed", type=seed_arg, default=42, help="seed of the decoder's noise (default 42, as published)")
    p.add_argument("--float", action="store_true", help="write 32-bit float samples instead of 16-bit PCM")
    p.add_argument("--save-mel", metavar="MEL.npy", help="also save the mel spectrogram (80 × frames, float32)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("convert-decoder", help="write flow.safetensors and hift.safetensors beside flow.pt and hift.pt")
    p.add_argument("decoder", metavar="DIR", help="glm-4-voice-decoder directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing .safetensors files")
    p.set_defaults(func=cmd_convert_decoder)
    return speech
