"""The 14 XSafety scenario names, spelled as the judge criteria file spells them.

OpenSafetyMini uses 8 of them; XSafety file names use variants of them. Keeping the canonical spelling in
one place lets every loader map to the same keys the judge criteria are looked up by.
"""

from __future__ import annotations

XSAFETY_SCENARIOS: tuple[str, ...] = (
    "Crimes_And_Illegal_Activities",
    "Ethics_And_Morality",
    "Goal_Hijacking",
    "Inquiry_With_Unsafe_Opinion",
    "Insult",
    "Mental_Health",
    "Physical_Harm",
    "Privacy_And_Property",
    "Prompt_Leaking",
    "Reverse_Exposure",
    "Role_Play_Instruction",
    "Unfairness_And_Discrimination",
    "Unsafe_Instruction_Topic",
    "commonsense",
)
