# A stand-in for OpenAI's ``dall_e`` package, with its module paths, class names, attribute
# names and parameter names, so the tests can write files with the same pickle structure as
# OpenAI's encoder.pkl and decoder.pkl. It is only importable while a test puts it on sys.path.
