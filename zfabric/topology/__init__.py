"""Topologies: a whole fabric declared once (in YAML or code), checked, started and looked up by name."""

from .load import load_topology, load_topology_text
from .model import ForwarderSpec, GroupSpec, QueueSpec, ServiceSpec, TopicSpec, Topology

__all__ = ["ForwarderSpec", "GroupSpec", "QueueSpec", "ServiceSpec", "TopicSpec", "Topology", "load_topology",
           "load_topology_text"]
