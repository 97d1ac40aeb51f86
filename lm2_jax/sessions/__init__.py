"""Inference: prefill and cached decoding through the segment recurrence, sampling, sessions with episodic memory."""

from lm2_jax.sessions.decoding import DecodeState, Decoder, Sampling, decoder_for, generate
from lm2_jax.sessions.session import Session

__all__ = ["DecodeState", "Decoder", "Sampling", "Session", "decoder_for", "generate"]
