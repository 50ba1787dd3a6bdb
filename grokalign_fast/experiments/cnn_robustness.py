NAME = "cnn_robustness"
HELP = "todo"
def add_arguments(p): pass
def main(args): raise NotImplementedError
