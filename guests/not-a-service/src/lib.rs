//! A valid component that is not a Ferry service: it exports `greet` instead of the handler
//! interface. Tests check the host refuses it and names what is missing.

wit_bindgen::generate!({
    inline: "package test:other; world other { export greet: func() -> string; }",
});

struct Other;

impl Guest for Other {
    fn greet() -> String {
        "hello".into()
    }
}

export!(Other);
