import json

import pytest

from nemo_loop.data.prompts import PromptSampler, PromptSetConfig, load_prompt_set
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


def test_bad_records_name_the_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"problem": "1+1", "answer": 2}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"set.jsonl:2: not valid JSON"):
        load_prompt_set(PromptSetConfig(path=str(path)))
    path.write_text(json.dumps({"problem": "1+1", "answer": 2}) + "\n" +
                    json.dumps({"question": "2+2", "answer": 4}) + "\n")
    with pytest.raises(ValueError, match=r"set.jsonl:2: missing field 'problem'"):
        load_prompt_set(PromptSetConfig(path=str(path)))
    with pytest.raises(ValueError, match="####"):
        load_prompt_set(PromptSetConfig(path=str(path), problem_field="problem",
                                        answer_format="after_hashes", limit=1))
    with pytest.raises(FileNotFoundError, match="prompt set not found"):
        load_prompt_set(PromptSetConfig(path=str(tmp_path / "missing.jsonl")))


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
