//! Shapes `#[cached]` refuses, with the compiler's message for each.

#[test]
fn refused_shapes_fail_to_compile_with_a_clear_message() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
