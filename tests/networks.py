"""Networks shared by tests: the one MegEngine trained for ``trained_net.mge``.

Mirrors ``tests/fixtures/megengine/make_fixtures.py::Net`` (which runs only under the
MegEngine oracle, so it cannot be imported here); the fixture README describes it.
"""

import volconv.functional as F
import volconv.module as M


class Net(M.Module):
    """``make_fixtures.Net``: the network of ``trained_net.mge``."""

    def __init__(self):
        super().__init__()
        self.conv1 = M.Conv3d(1, 4, 3, padding=1)
        self.conv2 = M.Conv3d(4, 8, 3, stride=2, padding=1, groups=2)
        self.up = M.ConvTranspose3d(8, 4, 2, stride=2)
        self.fc = M.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.up(x))
        x = F.mean(x, axis=(2, 3, 4))
        return self.fc(x)
