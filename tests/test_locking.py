"""A folder one process works in: a second claimant gets one line naming the holder and what to do."""

import pytest

from skip2lora.errors import UserError
from skip2lora.locking import lock_or_refuse


def test_a_second_claimant_is_refused_in_one_line_until_the_first_lets_go(tmp_path):
    first = lock_or_refuse(tmp_path, "another pipeline", "wait for it")
    with pytest.raises(UserError, match=r"^another pipeline \(process \d+\) is using .*: wait for it$"):
        lock_or_refuse(tmp_path, "another pipeline", "wait for it")
    first.release()
    lock_or_refuse(tmp_path, "another pipeline", "wait for it").release()
