"""What a forward pass touches: the Llama backbone, attention, the FFN slot (dense or MoE experts),
token routing and the fused losses. Imports nothing from moe_lab but config."""
