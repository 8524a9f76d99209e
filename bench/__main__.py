"""`python -m bench`: run every benchmark and print its figures."""

from bench import book_apply

if __name__ == "__main__":
    book_apply.main()
