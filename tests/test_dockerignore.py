"""Docker's .dockerignore rules (recipe/dockerignore.py), as moby/patternmatcher applies them."""
from stacker_kernel.recipe.dockerignore import excluded, parse


def test_patterns_exceptions_and_double_stars_follow_dockers_rules():
    patterns = parse("""
# a comment
*.log
!keep.log
  node_modules  
/build/
**/*.tmp
docs/**/draft*
!docs/**/draft-ok.md
sub/a?c
[xy].bin
""")
    def ex(path):
        return excluded(patterns, path)

    assert ex("app.log") and not ex("keep.log") and not ex("src/app.log")  # * stays in one part
    assert ex("node_modules") and ex("node_modules/pkg/index.js")  # a directory takes its contents
    assert ex("build") and ex("build/out.o") and not ex("src/build")
    assert ex("x.tmp") and ex("a/b/c.tmp")  # ** is any number of parts, none too
    assert ex("docs/draft1.md") and ex("docs/a/b/draft2.md") and not ex("docs/a/draft-ok.md")
    assert ex("sub/abc") and not ex("sub/abbc")
    assert ex("x.bin") and not ex("z.bin")
    assert not ex("src/main.go") and not ex(".")
    assert not ex("# a comment")


def test_the_last_matching_line_decides():
    assert not excluded(parse("*\n!src\n"), "src/main.c")
    assert excluded(parse("!src\n*\n"), "src/main.c")
    assert excluded(parse("**\n!*.md\n"), "a/b.txt") and not excluded(parse("**\n!*.md\n"), "README.md")
