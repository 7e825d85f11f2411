"""A tiny pretrained-like base without a chat template: it has read plain chat transcripts, never learned to end a turn.

What an admin's template-less base is to a persona nobody trained (the retrieval persona, the base-model fallback): it
knows the shape of a transcript, so after "Assistant:" it writes a line and goes on with "User:" and the next turns,
and it never writes the end-of-sequence token the made-up plain format closes a turn with.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from core.chatformat import EXAMPLE_CUE, PLAIN_TEMPLATE, ChatFormat, system_prompt

# No ChatML markers in the vocabulary: ChatFormat.from_vocab gives such a base the plain format.
SPECIALS = ("<unk>", "<s>", "</s>")
BOS, EOS = "<s>", "</s>"
NAMES = ("Bob", "Carol", "Dan")
LINES = (
    "hey whats up",
    "anyone around for a game tonight?",
    "lol yes",
    "omg that build is so good",
    "nah try restarting the server first",
    "see you tomorrow",
    "pizza tonight?",
    "i think we should meet at 7",
    "haha nice",
    "ok cool",
    "yes! where?",
    "no way",
    "brb",
    "same lol",
    "did you check the logs",
    "that movie was great",
)


def transcripts(n: int, seed: int = 0) -> list[str]:
    """`n` conversations rendered in the made-up plain format; half keep the end-of-sequence token between turns."""
    rng = random.Random(seed)
    fmt = ChatFormat(template=PLAIN_TEMPLATE, eos_token=EOS, bos_token=BOS)
    docs = []
    for i in range(n):
        style = rng.choice(("plain", "persona"))
        messages = [{"role": "system", "content": system_prompt("Ada", "general", style=style)}]
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.2:
                user = EXAMPLE_CUE  # the retrieval persona's few-shot turns
            else:
                lines = rng.sample(LINES, rng.randint(1, 2))
                named = style == "persona"
                user = "\n".join(f"{rng.choice(NAMES)}: {line}" if named else line for line in lines)
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": rng.choice(LINES)},
            ]
        text = fmt.render(messages, add_generation_prompt=False)
        # A pretrained base has seen transcripts, not this product's format: half have no end-of-turn token at all.
        docs.append(text if i % 2 else text.replace(EOS, ""))
    return docs


def build_tokenizer(corpus: list[str]) -> Any:
    """A byte-level BPE tokenizer trained on `corpus`, with the specials of a base that has no ChatML markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token="<unk>", pad_token="<unk>"
    )


def _fit(model: Any, tokenizer: Any, corpus: list[str], *, steps: int, seed: int) -> None:
    """Next-token training on the transcripts; the end-of-sequence token is read but never a target."""
    import torch

    ids: list[int] = []
    for doc in corpus:
        ids += tokenizer(doc + "\n", add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids)
    window, batch = 96, 16
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + window] for s in starts.tolist()])
        labels = x.clone()
        # Never learning to write it is what makes this base "untrained" for the format: a trained adapter does.
        labels[labels == tokenizer.eos_token_id] = -100
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_plain_base(dest: Path, *, steps: int = 300, seed: int = 0) -> Path:
    """Write the tiny transcript-reading base to `dest/plain.gguf` (no chat template in it) and return its path."""
    import torch

    from trainer.tinymodel import build_model, write_gguf

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    corpus = transcripts(400, seed)
    tokenizer = build_tokenizer(corpus)
    model = build_model(len(tokenizer), seed=seed)
    _fit(model, tokenizer, corpus, steps=steps, seed=seed)
    path = dest / "plain.gguf"
    write_gguf(model, tokenizer, path, name="tiny-plain", chat_template=False)
    return path
