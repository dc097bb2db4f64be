import json

import pytest

from nemo_loop.data.chat import ChatConfig, ChatTokenizer
from nemo_loop.data.prompts import (
    PromptRecord,
    PromptSampler,
    PromptSetConfig,
    PromptSetError,
    default_data_root,
    load_prompt_set,
)
from nemo_loop.data.sequences import build_batch, response_targets


def test_real_prompt_sets_load_as_they_are():
    math = load_prompt_set(PromptSetConfig())
    assert len(math) == 7474 and math[0].answer == "0"
    gsm = load_prompt_set(PromptSetConfig(path="gsm8k/train.jsonl", problem_field="question",
                                          answer_format="after_hashes"))
    assert len(gsm) == 7473 and gsm[0].answer == "72"
    aime = load_prompt_set(PromptSetConfig(path="aime_1983_2023/deepscaler_aime_train.json",
                                           solution_field="solution"))
    assert aime[0].solution
    assert [r.id for r in aime[:3]] == ["0", "1", "2"]  # no id_field: the index


def test_bad_records_name_the_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"problem": "1+1", "answer": 2}) + "\n{not json\n")
    with pytest.raises(PromptSetError, match=r"set.jsonl:2: malformed JSON"):
        load_prompt_set(PromptSetConfig(path=str(path)))
    path.write_text(json.dumps({"problem": "1+1", "answer": 2}) + "\n" +
                    json.dumps({"question": "2+2", "answer": 4}) + "\n")
    with pytest.raises(PromptSetError, match=r"set.jsonl:2: missing field 'problem'"):
        load_prompt_set(PromptSetConfig(path=str(path)))
    with pytest.raises(PromptSetError, match=r"set.jsonl:1: field 'answer' holds no answer in "
                                             r"'after_hashes' format"):
        load_prompt_set(PromptSetConfig(path=str(path), problem_field="problem",
                                        answer_format="after_hashes", limit=1))
    path.write_text(json.dumps({"problem": "1+1", "answer": 2}) + "\n[1, 2]\n")
    with pytest.raises(PromptSetError, match=r"set.jsonl:2: record is a list, not a JSON object"):
        load_prompt_set(PromptSetConfig(path=str(path)))
    array = tmp_path / "set.json"
    array.write_text('[{"problem": "a", "answer": 1},\n {"problem": }]')
    with pytest.raises(PromptSetError, match=r"set.json:2: malformed JSON"):
        load_prompt_set(PromptSetConfig(path=str(array)))
    with pytest.raises(FileNotFoundError, match="prompt set not found"):
        load_prompt_set(PromptSetConfig(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="answer_format"):
        load_prompt_set(PromptSetConfig(path=str(path), answer_format="boxed"))


def test_answer_formats_ids_and_relative_paths(tmp_path):
    path = tmp_path / "sets" / "mine.jsonl"
    path.parent.mkdir()
    records = [{"q": 12, "sol": r"so $\boxed{\frac{1}{2}}$.", "gsm": "3 * 4 = 12\n#### 1,012",
                "key": 7},
               {"q": "Why?", "sol": r"\boxed{2} then \boxed{3}", "gsm": "#### 5", "key": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # blank lines skipped
    boxed = PromptSetConfig(path="sets/mine.jsonl", problem_field="q", answer_field="sol",
                            answer_format="last_boxed", id_field="key")
    assert load_prompt_set(boxed, data_root=tmp_path) == [
        PromptRecord("12", r"\frac{1}{2}", None, "7"), PromptRecord("Why?", "3", None, "b")]
    hashes = PromptSetConfig(path=str(path), problem_field="q", answer_field="gsm",
                             answer_format="after_hashes", solution_field="sol", limit=1)
    [record] = load_prompt_set(hashes)
    assert (record.answer, record.solution, record.id) == ("1012", records[0]["sol"], "0")
    with pytest.raises(FileNotFoundError, match=f"under {default_data_root()}"):
        load_prompt_set(PromptSetConfig(path="sets/mine.jsonl", problem_field="q"))
    path.write_text(json.dumps({"q": None, "sol": "1"}) + "\n")
    with pytest.raises(PromptSetError, match=r"mine.jsonl:1: field 'q' is empty"):
        load_prompt_set(PromptSetConfig(path=str(path), problem_field="q", answer_field="sol"))
    path.write_text(json.dumps({"q": "x", "sol": "no box"}) + "\n")
    with pytest.raises(PromptSetError, match=r"mine.jsonl:1: field 'sol' holds no answer in "
                                             r"'last_boxed' format"):
        load_prompt_set(PromptSetConfig(path=str(path), problem_field="q", answer_field="sol",
                                        answer_format="last_boxed"))


def test_numeric_answers_become_text(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": 27.0}) + "\n")
    assert load_prompt_set(PromptSetConfig(path=str(path)))[0].answer == "27"


def test_sampler_resumes_at_the_same_position():
    sampler = PromptSampler(10, seed=3)
    first = sampler.next_indices(7)
    state = sampler.state_dict()
    rest = sampler.next_indices(8)  # crosses into the next epoch
    resumed = PromptSampler(10, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_indices(8) == rest
    assert sorted(first + rest[:3]) == list(range(10))
    with pytest.raises(ValueError, match="data position"):
        PromptSampler(11, seed=3).load_state_dict(state)


def test_student_and_teacher_batches_align_the_response_tokens():
    responses = [[7, 8, 9], [5]]
    student = build_batch([[1, 2], [1, 2, 3]], responses, pad_id=0)
    teacher = build_batch([[1, 2, 40, 41, 42], [1, 40, 2, 3]], responses, pad_id=0)
    for batch in (student, teacher):
        window = batch.response_window
        # the token predicted from column c is at column c + 1
        targets = batch.input_ids[:, window.start + 1: window.stop + 1]
        assert targets[0].tolist() == [7, 8, 9] and targets[1, 0].item() == 5
        assert batch.position_ids[1, batch.prompt_length].item() == \
            len([t for t in batch.input_ids[1, :batch.prompt_length] if t != 0])
    ids, mask = response_targets(responses, student.response_length, pad_id=0)
    assert ids.t().tolist() == [[7, 8, 9], [5, 0, 0]]
    assert mask.t().tolist() == [[1, 1, 1], [1, 0, 0]]
    # left padding is masked out of attention
    assert student.attention_mask[0, 0, -1, 0].item() is True
    assert student.attention_mask[1, 0, -1, 0].item() is False


@pytest.fixture(scope="module")
def tokenizer_dir():
    path = default_data_root() / "tokenizer" / "ouro-1.4b"
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"no Ouro tokenizer at {path}")
    return path


def test_chatml_prompt_is_the_tokenizers_chat_template(tokenizer_dir):
    jinja2 = pytest.importorskip("jinja2")
    template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    chat = ChatTokenizer.from_file(ChatConfig(tokenizer_path=str(tokenizer_dir)))
    message = chat.user_message("What is $1+1$?")
    assert message == "What is $1+1$?\nPlease reason step by step, and put your final answer " \
                      "within \\boxed{}."
    expected = jinja2.Template(template).render(
        messages=[{"role": "user", "content": message}], add_generation_prompt=True)
    assert chat.prompt_text("What is $1+1$?") == expected
    ids = chat.encode_prompt("What is $1+1$?")
    assert ids[0] == chat.im_start_id == 1 and ids.count(chat.im_end_id) == 2
    assert chat.decode(ids).endswith("assistant\n")
    assert chat.stop_token_ids == [0, 2] and chat.pad_id == 0  # <|endoftext|>, <|im_end|>


def test_chat_history_renders_like_the_tokenizers_chat_template(tokenizer_dir):
    """lm-eval's few-shot chat histories (several turns, a system turn of its own or none)."""
    jinja2 = pytest.importorskip("jinja2")
    template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    chat = ChatTokenizer.from_file(ChatConfig(tokenizer_path=str(tokenizer_dir)))
    turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": "2+2?"}]
    for history in (turns, [{"role": "system", "content": "Answer tersely."}, *turns]):
        expected = jinja2.Template(template).render(messages=history, add_generation_prompt=True)
        assert chat.render_chat(history) == expected
    # Left open for the model to continue (lm-eval's continue_final_message).
    opened = chat.render_chat([*turns, {"role": "assistant", "content": "The answer is"}],
                              add_generation_prompt=False)
    assert opened.endswith("<|im_start|>assistant\nThe answer is")
    plain = ChatTokenizer.from_file(ChatConfig(tokenizer_path=str(tokenizer_dir),
                                               template="plain"))
    assert plain.render_chat(turns) == "1+1?\n2\n2+2?\n"
    assert plain.render_chat(turns, add_generation_prompt=False) == "1+1?\n2\n2+2?"


def test_teacher_prompt_differs_from_student_only_by_the_context(tokenizer_dir):
    chat = ChatTokenizer.from_file(ChatConfig(), data_root=tokenizer_dir.parents[1])
    student = chat.prompt_text("2+2?")
    teacher = chat.prompt_text("2+2?", context="(The answer is 4.)")
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    assert teacher == student.replace(suffix, "\n\n(The answer is 4.)" + suffix)


def test_plain_template_and_system_prompt_options(tokenizer_dir):
    plain = ChatTokenizer.from_file(ChatConfig(tokenizer_path=str(tokenizer_dir / "tokenizer.json"),
                                     template="plain", instruction_suffix="Show your work."))
    assert plain.prompt_text("  2+2?") == "2+2?\nShow your work.\n"
    bare = ChatTokenizer.from_file(ChatConfig(tokenizer_path=str(tokenizer_dir), system_prompt=None,
                                    instruction_suffix=""))
    assert bare.prompt_text("2+2?") == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        ChatTokenizer.from_file(ChatConfig(tokenizer_path="nowhere"), data_root=tokenizer_dir)
    with pytest.raises(ValueError, match="prompt.template"):
        ChatConfig(template="html").validate()
