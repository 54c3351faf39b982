"""Synapse module of matrix-policy-bridge.

Configure it in homeserver.yaml as ``policy_bridge_synapse.PolicyBridgeModule``; it forwards
Synapse's spam-checker callbacks (with their full context) and uploaded files to the bridge's
gate. It needs nothing Synapse does not ship.
"""

from policy_bridge_synapse.module import PolicyBridgeModule

__all__ = ["PolicyBridgeModule"]
__version__ = "0.1.0"
