"""natOutgoing and hostPorts in a node's kernel: the host-kernel scenarios again, in the qemu lab VM.

test_cni_nat_hostkernel.py runs on this machine's kernel (6.x, which has IPv4 nftables NAT); this
module runs its hostPort and natOutgoing tests in Debian 12's own kernel (6.1, what a node runs), so
the table's syntax (`dnat ip to ... map` over concatenations, `fib daddr type local` in output) is
proven on it too. The 1,000-cycle test stays on the host kernel: under TCG emulation it would take
minutes. Marked `nat`: one VM boot for every nat test (tests/conftest.py).
"""

from __future__ import annotations

import pytest

from tests.kernel.test_cni_nat_hostkernel import _usable, node  # noqa: F401 - the module's fixture
from tests.kernel.test_cni_nat_hostkernel import test_hostport_from_outside_hairpin_and_from_the_node  # noqa: F401
from tests.kernel.test_cni_nat_hostkernel import test_nat_outgoing_masquerades_to_the_node_and_can_be_turned_off  # noqa: F401

pytestmark = [pytest.mark.nat, pytest.mark.skipif(_usable() is not None, reason=_usable() or "")]
