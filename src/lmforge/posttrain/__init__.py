"""Post-training: the data formats (chat, instruction, prompt/completion, preference pairs),
packing of encoded examples into rows, and the runs that fine-tune (SFT) and align
(reward, DPO, ORPO, PPO) a pretrained checkpoint on the existing training loop."""
