import pytest


@pytest.fixture(scope="module")
def two_cpu_cluster():
    """A Ray cluster of one 2-CPU head node on this machine; job subprocesses join it by its address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()
