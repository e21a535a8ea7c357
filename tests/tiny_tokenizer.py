"""A real (if tiny) fast tokenizer, trained in milliseconds, so tests exercise the same tokenizer API as SmolLM2's.

Byte-level BPE never produces an unknown token, so any text -- including the WikiText rows -- can be tokenized.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SAMPLE_TEXT = """\
 = Valkyria Chronicles III =

 Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game developed by Sega .
 The game began development in 2010 , carrying over a large portion of the work done on Valkyria Chronicles II .
 It met with positive sales in Japan , and was praised by both Japanese and western critics .
 The game 's battle system , the BliTZ system , is carried over directly from Valkyria Chronicles .
 Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role on the
 television series The Bill in 2000 . This was followed by a starring role in the play Herons written by
 Simon Stephens , which was performed in 2001 at the Royal Court Theatre .
"""


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with at most ``vocab_size`` ids (256 bytes + merges + one special token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or SAMPLE_TEXT.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
