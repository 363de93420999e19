# Package marker: only the vendored modules above are present (the original __init__ imports every model).
