from mmdiff import special_tokens as st
from mmdiff.special_tokens import SpecialIds
from mmdiff.tokenizer import load_tokenizer, save_tokenizer


def test_roundtrip_and_special_tokens(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    text = "how many red circles are there? Zebra!"  # unseen word still encodes (byte level)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    save_tokenizer(tok, tmp_path)
    tok2 = load_tokenizer(tmp_path)
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids
    sp = SpecialIds.from_tokenizer(tok2)
    assert sp.mask == 0 and len({sp.mask, sp.pad, sp.eos, sp.bos, sp.image, sp.audio}) == 6
    # a special token string is one token
    assert tok2(st.IMAGE + "hi", add_special_tokens=False)["input_ids"][0] == sp.image


def test_chat_template(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": st.IMAGE + "where?"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == f"{st.BOS}{st.USER}{st.IMAGE}where?{st.END_TURN}{st.ASSISTANT}"
