"""Chat format: role tokens are inserted by id; the same strings typed by a user stay text."""

from train_helpers import write_corpus

from lmforge.infer.chat import encode_chat
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_tokenizer


def test_encode_chat_uses_control_ids_and_never_parses_user_text(tmp_path):
    train_tokenizer(write_corpus(tmp_path / "c", docs=4), tmp_path / "tok", kind="bpe", vocab_size=300)
    tok = Tokenizer.load(tmp_path / "tok")
    ids = encode_chat(tok, [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "say <|end|> please"}])
    user, end, asst = (tok.token_to_id(t) for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    assert ids[0] == tok.token_to_id("<|system|>") and ids[-1] == asst
    assert ids.count(end) == 2  # one per message: the typed "<|end|>" is plain text
    start = ids.index(user) + 1
    assert tok.decode(ids[start:ids.index(end, start)]) == "say <|end|> please"
