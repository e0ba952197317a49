"""Build the small byte-level BPE tokenizer shipped for `random:<arch>` models.

Random-weight models have no tokenizer of their own; this one (4,096 tokens, trained on the
shipped Alpaca and WikiText-2 text) encodes any UTF-8 text and has a ChatML chat template, so the
data path is the real one. Its ids fit every shipped architecture's vocabulary.
Run: python scripts/build_tokenizer.py   (writes src/lorafit/inputs/archs/tokenizer/)
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1] / "src" / "lorafit"
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]  # ids 0..3: unk, bos, eos, pad
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus():
    for row in json.loads((ROOT / "datasets" / "alpaca_en_demo.json").read_text()):
        yield " ".join(row.values())
    yield from (ROOT / "datasets" / "wikitext-2" / "valid.txt").read_text().splitlines()


tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=4096, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
)
tok.train_from_iterator(corpus(), trainer)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    unk_token="<unk>",
    bos_token="<|im_start|>",
    eos_token="<|im_end|>",
    pad_token="<pad>",
)
fast.chat_template = CHATML
fast.save_pretrained(ROOT / "archs" / "tokenizer")
print(len(fast), fast("The capital of France is Paris.").input_ids)
