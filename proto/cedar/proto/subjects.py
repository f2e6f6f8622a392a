SUBJ: str = "a"
